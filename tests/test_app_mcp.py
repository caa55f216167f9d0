"""The app as an MCP server (Gradio's launch(mcp_server=True)), driven by the `mcp` package's client over
streamable HTTP, offline, on a tiny model: an agent lists the tools, reads their limits, and generates and reads
word maps. Plus the docstrings Gradio turns into tool and API descriptions.
"""

import asyncio
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import pytest
from gradio.utils import get_function_description
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import app
from diffusion.limits import Choice
from diffusion.serving import Settings
from tests.serving import free_port
from tests.tiny import tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning", "ignore::UserWarning")
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def demo():
    return app.build_demo(tiny_pipeline())


def test_every_api_parameter_is_described_with_its_limits(demo):
    # Gradio reads one docstring line per argument (API page, MCP tool descriptions): the rest would be lost.
    endpoints = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name and fn.api_visibility == "public"}
    assert set(endpoints) == {"generate", "attention", "self_attention", "export_maps", "word_maps",
                              "compare"}
    for api_name, fn in endpoints.items():
        _, described, _ = get_function_description(fn)
        for name, text in described.items():
            if name in ("result", "request", "progress"):  # set by Gradio, not by a caller
                continue
            assert text.endswith("."), (api_name, name, text)  # the whole description, not its first line
            if api_name in ("generate", "word_maps"):  # the agents' tools: their limits from CHECKS, verbatim
                check = Choice(("default",)) if name == "model" else app.CHECKS[name]  # the served models' names
                assert check.describe() in text, (api_name, name, text)


@pytest.fixture(scope="module")
def mcp_url(demo, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        try:
            _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                    quiet=True, **app.launch_options(Settings()))
            yield f"{url}gradio_api/mcp/"
        finally:
            demo.close()


def over_mcp(url: str, session_fn):
    """Run session_fn(session) in an initialised MCP client session."""

    async def run():
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            return await session_fn(session)

    return asyncio.run(run())


def test_an_agent_lists_the_tools_that_work_without_a_session(mcp_url):
    tools = {t.name: t for t in over_mcp(mcp_url, lambda s: s.list_tools()).tools}
    # generate, attention, self_attention, export_maps and compare write or read a session's last run (or
    # comparison): Gradio's MCP server shares one session between all agents, so they are not offered there (app.py,
    # "agents").
    assert set(tools) == {"word_maps"}
    word_maps = tools["word_maps"]
    assert "where each of its words looked" in word_maps.description
    props = word_maps.inputSchema["properties"]
    assert set(props) == {"prompt", "negative_prompt", "steps", "guidance", "seed", "sampler", "model"}
    assert props["model"]["description"].endswith("one of 'default'.")
    assert props["steps"]["description"].endswith("a whole number from 1 to 100.")
    assert props["prompt"]["description"].endswith("non-empty text of at most 300 characters.")
    assert set(props["sampler"]["enum"]) == set(app.SAMPLERS)


def test_an_agent_generates_and_reads_word_maps(mcp_url):
    progress = []

    async def call(session):
        async def on_progress(value, total, message):
            progress.append(message)

        return await session.call_tool("word_maps", {"prompt": PROMPT, "steps": 2, "seed": 3},
                                       progress_callback=on_progress)

    result = over_mcp(mcp_url, call)
    assert not result.isError and progress  # a client that asks for progress gets it, queue place included
    images = [c for c in result.content if c.type == "image"]
    texts = [c.text for c in result.content if c.type == "text"]
    assert [i.mimeType for i in images] == ["image/png", "image/png"]  # the sample and its word overlays
    summary = next(t for t in texts if "'words'" in t)
    for word in ["red", "circle", "blue", "square"]:
        assert f"'{word}': {{'share'" in summary
    assert "'seed': 3" in summary and "'region'" in summary


def test_without_progress_the_word_maps_still_come_back_as_text(mcp_url):
    # Gradio 6.31 then returns all outputs as one text (the images as URLs): the numbers still reach the agent.
    result = over_mcp(mcp_url, lambda s: s.call_tool("word_maps", {"prompt": PROMPT, "steps": 1, "seed": 4}))
    assert not result.isError and len(result.content) == 1
    text = result.content[0].text
    assert "'words'" in text and "'red': {'share'" in text and "gradio_api/file=" in text


def test_a_bad_tool_call_says_what_was_wrong(mcp_url):
    result = over_mcp(mcp_url, lambda s: s.call_tool("word_maps", {"prompt": PROMPT, "steps": 1000}))
    assert result.isError
    assert result.content[0].text == "steps must be a whole number from 1 to 100; got 1000 (a number)."


def test_generate_called_over_mcp_anyway_keeps_no_maps_in_the_shared_session(demo, mcp_url):
    async def call(session):
        async def on_progress(value, total, message):
            pass

        return await session.call_tool("generate_images", {
            "prompt": PROMPT, "steps": 1, "seed": 7, "randomize_seed": False, "num_images": 1},
            progress_callback=on_progress)

    result = over_mcp(mcp_url, call)
    assert not result.isError, result.content
    assert any(app.MCP_NOTE in c.text for c in result.content if c.type == "text")
    assert demo.maps_budget.nbytes == 0
