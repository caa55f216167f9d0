"""The queue of a busy server, live through gradio_client: the waiting see their place and the expected wait, one
more is told the queue is full (and the server goes on answering), and every request the queue took is answered.

The torch thread is held busy with a gate, so the queue fills however fast the machine is.
"""

import os
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import httpx
import pytest
from gradio_client import Client
from gradio_client.utils import QueueError, Status

import app
from diffusion.serving import Settings
from tests.serving import free_port, wait_until
from tests.tiny import tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning", "ignore::UserWarning")

QUEUE_SIZE = 2


def generate(client: Client, seed: int):
    return client.submit(prompt="a red circle", steps=1, seed=seed, randomize_seed=False, sampler="ddim",
                         num_images=1, api_name="/generate")


def test_a_full_queue_says_so_the_waiting_see_their_place_and_no_request_is_lost(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = app.build_demo(tiny_pipeline(), Settings(queue_size=QUEUE_SIZE))
    gate = threading.Event()
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True)
        client = Client(url, verbose=False)
        generate(client, 0).result(timeout=60)  # one run: now Gradio knows how long a run takes
        app._COMPUTE.submit(gate.wait)  # the torch thread is busy until the gate opens

        running = generate(client, 1)
        assert wait_until(lambda: running.status().code in (Status.PROCESSING, Status.PROGRESS))
        waiting = [generate(client, 2)]  # the second joins once the first is in: their order is fixed
        assert wait_until(lambda: waiting[0].status().code == Status.IN_QUEUE)
        waiting.append(generate(client, 3))
        # Gradio tells each waiting client its place, the queue's length and the expected wait (when someone
        # joins, those behind them hear of it: the first to join still sees a queue of one).
        assert wait_until(lambda: all(s.code == Status.IN_QUEUE and s.eta is not None
                                      for s in [job.status() for job in waiting])), [job.status() for job in waiting]
        places = [job.status() for job in waiting]
        assert [(s.rank, s.queue_size) for s in places] == [(0, 1), (1, QUEUE_SIZE)]
        assert 0 < places[0].eta < places[1].eta  # seconds; the second waits for the first

        with pytest.raises(QueueError, match="Queue is full"):
            generate(client, 4).result(timeout=60)
        # Any other HTTP client gets a 503 that says how full the queue is.
        fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == "generate")
        joined = httpx.post(f"{url}gradio_api/queue/join", json={
            "data": ["a red circle", "", 1, 4.0, 5, False, "ddim", 1, 50.0, 20.0], "fn_index": fn_index,
            "session_hash": "somebody-else", "event_data": None, "trigger_id": None})
        assert joined.status_code == 503
        assert joined.json()["detail"] == f"Queue is full. Max size is {QUEUE_SIZE} and size is {QUEUE_SIZE}."
        assert httpx.get(f"{url}gradio_api/info").status_code == 200  # the server still answers
    finally:
        gate.set()
    try:
        # Every request the queue took is answered, in order; the one turned away can try again.
        assert [job.result(timeout=60)[1] for job in [running, *waiting]] == [1, 2, 3]
        assert generate(client, 4).result(timeout=60)[1] == 4
    finally:
        demo.close()
