"""Schemathesis against the app's own OpenAPI schema: every route, in-process (ASGI),
with both backbones loaded. No answer may be a 5xx, and every 4xx carries the one JSON
error body ``{"error": {"code", "message"}}``.

The operations are driven from one test with hypothesis directly (``as_strategy``):
the app's lifespan (and so its loaded models) then lives for the whole run, where a
test per operation would reload the models for each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.main import create_app
from service.settings import Settings
from tests.llava_fixtures import save_tiny_llava

TOKEN = "fuzz-admin-token"
EXAMPLES = 30  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("fuzz-llava"))


def unresolved_refs(document: dict[str, Any]) -> list[str]:
    """Every local ``$ref`` in ``document`` that names nothing in it."""
    missing = []

    def resolves(ref: str) -> bool:
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/") and not resolves(ref):
                missing.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return missing


@pytest.fixture
def fuzz_app(tiny_clip_dir: Path, fuzz_llava_dir: Path, tmp_path: Path) -> Any:
    app = create_app(
        Settings(
            clip_model=str(tiny_clip_dir),
            llava_model=str(fuzz_llava_dir),
            device="cpu",
            dtype="float32",
            max_wait_ms=1.0,
            adapter_dir=tmp_path / "adapters",
            admin_token=TOKEN,
            max_new_tokens=8,
        )
    )
    client = schemathesis.python.asgi.get_client(app)
    with client:  # starts the lifespan; schemathesis ends it after the test
        give_up = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:  # models load in the background
            assert time.monotonic() < give_up, "the app did not become ready"
            time.sleep(0.05)
        document = client.get("/openapi.json").json()
    return app, document


def test_openapi_refs_all_resolve(fuzz_app: Any) -> None:
    _, document = fuzz_app
    assert unresolved_refs(document) == []


@pytest.fixture
def api_schema(fuzz_app: Any) -> Any:
    app, document = fuzz_app
    assert unresolved_refs(document) == []
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app  # in-process ASGI transport
    return schema


def error_body_on_4xx(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every client error is the service's JSON error body, never framework text."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error.get("code"), str) and error["code"], body
        assert isinstance(error.get("message"), str) and error["message"], body
    return None


def call(case: Any) -> None:
    headers = None
    if case.path.startswith("/v1/admin/"):
        # Past the token, so the upload and delete paths are reached; auth has its own tests.
        headers = {"Authorization": f"Bearer {TOKEN}"}
    if case.path.startswith("/v1/chat") and isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):  # mostly valid: generation is reached too
            if isinstance(case.body.get(key), int) and case.body[key] > 8:
                case.body[key] = 8
    case.call_and_validate(headers=headers, checks=[not_a_server_error, error_body_on_4xx], timeout=60)


def test_every_route_answers_without_5xx_and_with_json_errors(api_schema: Any) -> None:
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                call(case)

            try:
                run()
            except Unsatisfiable:
                continue  # nothing to negate (no parameters, or only free-form strings)
            except Exception as exc:  # collect every operation's failure, then fail once
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)
