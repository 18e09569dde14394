"""Session fixtures of the serving tests: the engine (tiny LM + exact index) and a live server; the
real instruct model (SmolLM2) and its server for the chat endpoint."""

from __future__ import annotations

import pytest

from tests.serving.support import CHAT_ENGINE_CONFIG, CHAT_MODEL, MODEL, TEST_ENGINE_CONFIG, ServerThread


def serve(engine, model_name: str, max_concurrent: int, timeout_s: float, governor: bool = True,
          **server_kw) -> ServerThread:
    """A live server around ``engine`` on a loopback port. ``governor=False``: no load governor,
    so a request that forces speculation (``os3: false``) speculates however busy the LM is."""
    from ralmspec.engine.governor import GovernorConfig
    from ralmspec.engine.scheduler import SchedulerConfig
    from ralmspec.serving.app import ServerConfig, create_app

    app = create_app(engine, SchedulerConfig(max_concurrent=max_concurrent, max_queue=16, request_timeout_s=timeout_s,
                                             governor=GovernorConfig(enabled=governor)),
                     server_config=ServerConfig(model_name=model_name, **server_kw))
    return ServerThread(app).start()


def openai_client(server: ServerThread, timeout_s: float):
    """The official ``openai`` client pointed at ``server``."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=timeout_s)


@pytest.fixture(scope="session")
def serving_engine(small_indexes, tiny_lm):
    """On the batched runner, which ``ralmspec serve`` runs on the CPU (``--lm-runner auto``);
    the chat server below runs the eager one."""
    from ralmspec.engine.core import RalmEngine
    from tests.lm.conftest import make_view

    return RalmEngine(make_view(tiny_lm, runner="batched"), small_indexes["exact"], TEST_ENGINE_CONFIG)


@pytest.fixture(scope="session")
def server(serving_engine):
    """The full server (tiny LM + exact knowledge base), shared by the serving tests."""
    srv = serve(serving_engine, MODEL, 8, 120, client_max_size=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client pointed at the shared server."""
    c = openai_client(server, 120)
    yield c
    c.close()


@pytest.fixture(scope="session")
def chat_engine(smollm2_lm, embedded_indexes):
    """The real instruct model (its chat template) over the full embedded knowledge base."""
    from ralmspec.engine.core import RalmEngine

    return RalmEngine(smollm2_lm, embedded_indexes["exact"], CHAT_ENGINE_CONFIG)


@pytest.fixture(scope="session")
def chat_server(chat_engine):
    """The SmolLM2 server, for the chat endpoint."""
    srv = serve(chat_engine, CHAT_MODEL, 4, 300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat_client(chat_server):
    c = openai_client(chat_server, 300)
    yield c
    c.close()
