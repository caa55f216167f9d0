"""data.debian.render_svg: SVGs drawn at the asked size whatever size they declare, and Illustrator-style
files with XML entities drawn too."""

import numpy as np

from data.debian import render_svg

RED_BOX = '<rect x="0" y="0" width="{w}" height="{h}" fill="#dd2222"/>'


def _svg(w, h, head="", xmlns='"http://www.w3.org/2000/svg"'):
    return (f'<?xml version="1.0"?>\n{head}<svg xmlns={xmlns} width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
            f'{RED_BOX.format(w=w, h=h)}</svg>')


def test_a_huge_declared_size_is_drawn_at_the_asked_size(tmp_path):
    # openclipart has files declaring 13,000 px: drawn first at that size they took minutes each
    wide, tall = tmp_path / "wide.svg", tmp_path / "tall.svg"
    wide.write_text(_svg(13000, 6500))
    tall.write_text(_svg(100, 400))
    assert render_svg(wide, 64).size == (64, 32)
    image = render_svg(tall, 64)
    assert image.size == (16, 64)
    assert np.asarray(image)[32, 8].tolist() == [0xdd, 0x22, 0x22, 255]


def test_a_file_that_declares_its_namespace_as_an_entity_is_drawn(tmp_path):
    # Illustrator's export: cairosvg's safe parser raises EntitiesForbidden, the retry allows entities
    head = '<!DOCTYPE svg [<!ENTITY ns_svg "http://www.w3.org/2000/svg">]>\n'
    path = tmp_path / "illustrator.svg"
    path.write_text(_svg(100, 50, head=head, xmlns='"&ns_svg;"'))
    image = render_svg(path, 40)
    assert image.size == (40, 20)
    assert np.asarray(image)[10, 20].tolist() == [0xdd, 0x22, 0x22, 255]
