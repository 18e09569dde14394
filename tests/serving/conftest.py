"""Session fixtures of the serving tests: the engine (tiny LM + exact index) and a live server."""

from __future__ import annotations

import pytest

from tests.serving.support import MODEL, TEST_ENGINE_CONFIG, ServerThread


@pytest.fixture(scope="session")
def serving_engine(small_indexes, tiny_lm):
    from ralmspec.engine.core import RalmEngine

    return RalmEngine(tiny_lm, small_indexes["exact"], TEST_ENGINE_CONFIG)


@pytest.fixture(scope="session")
def server(serving_engine):
    """The full server (tiny LM + exact knowledge base), shared by the serving tests."""
    from ralmspec.engine.scheduler import SchedulerConfig
    from serving.app import ServerConfig, create_app

    app = create_app(serving_engine, SchedulerConfig(max_concurrent=8, max_queue=16, request_timeout_s=120),
                     server_config=ServerConfig(model_name=MODEL, client_max_size=64 * 1024))
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client pointed at the shared server."""
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()
