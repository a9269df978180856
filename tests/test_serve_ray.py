"""Ray Serve (serve/ray_app.py): the same app as replicas on a real local Ray cluster on 127.0.0.1.

The slow tests deploy two replicas of the default model (one thread each) and drive them with the
openai client: concurrent requests are answered by both replicas (the X-Replica header), greedy
answers equal the single-process server's, and a replica killed mid-stream is replaced by Ray
while the next requests succeed. The cluster is shut down at the end, even when a test fails.
The fast tests check the options, the Serve config file and that the plain server never imports Ray.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
yaml = pytest.importorskip("yaml")

from serve_live import LiveServer  # noqa: E402

from llama2_onnx.assets import default_model_dir  # noqa: E402
from llama2_onnx.cli import main  # noqa: E402
from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.ray_app import (DEPLOYMENT, REPLICA_HEADER, ReplicaOptions, Scaling, app_builder,  # noqa: E402
                                       build_app)
from llama2_onnx.serve.service import Service  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = "llama2-onnx-test"
JOBS = [("The capital of France is", 12), ("Once upon a time", 16), ("def fibonacci(n):", 16), ("Water boils at", 10)]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# ---- fast: options, config file, imports ----------------------------------------------------------


def test_plain_server_never_imports_ray():
    code = ("import sys, llama2_onnx.cli as c, llama2_onnx.serve.cli, llama2_onnx.serve.app, llama2_onnx.serve.score\n"
            "c.build_parser()\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas need --ray"),
    (["--ray-address", "auto"], "--ray-address need --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1"),
    (["--ray", "--autoscale", "3"], "--autoscale takes MIN:MAX"),
    (["--ray", "--autoscale", "3:1"], "0 <= MIN <= MAX"),
    (["--ray", "--autoscale", "0:0"], "MAX >= 1"),
    (["--ray", "--max-ongoing-requests", "0"], "--max-ongoing-requests must be at least 1"),
    (["--ray", "--autoscale", "1:2", "--target-ongoing-requests", "0"], "--target-ongoing-requests > 0"),
])
def test_ray_options_are_checked_before_anything_starts(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_replicas_and_autoscale_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--ray", "--replicas", "2", "--autoscale", "1:2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_scaling_becomes_deployment_options():
    fixed = Scaling(replicas=3, max_ongoing_requests=8).deployment_options(threads=2)
    assert fixed == {"ray_actor_options": {"num_cpus": 2}, "max_ongoing_requests": 8, "num_replicas": 3}
    auto = Scaling(replicas=None, min_replicas=0, max_replicas=4, target_ongoing_requests=2).deployment_options(threads=1)
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 2}
    assert "num_replicas" not in auto
    with pytest.raises(ValueError):
        Scaling(replicas=2, min_replicas=1, max_replicas=2)
    with pytest.raises(ValueError, match="unknown llama2-onnx replica option"):
        ReplicaOptions.from_dict({"model": "m", "thread": 2})


def test_serve_config_file_builds_the_app():
    """docs/serve_config.yaml is a valid Serve config whose import_path builds our deployment."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "docs" / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "llama2_onnx.serve.ray_app:app_builder"
    assert [d.name for d in app.deployments] == [DEPLOYMENT]
    built = app_builder(app.args)
    assert built._bound_deployment.name == DEPLOYMENT
    assert built._bound_deployment.ray_actor_options["num_cpus"] == app.args["threads"]


def test_rayservice_manifest_embeds_the_serve_config():
    docs = list(yaml.safe_load_all((ROOT / "docs" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["import_path"] == "llama2_onnx.serve.ray_app:app_builder"
    assert "/health" in yaml.safe_dump(service)


# ---- slow: a real local cluster -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client, model: str, prompt: str, n: int) -> tuple[str, str | None]:
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return raw.parse().choices[0].text, raw.headers.get(REPLICA_HEADER)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir):
    """The single-process server's greedy answers, with the replicas' thread count."""
    svc = Service.open(model_dir, max_batch=4, threads=1, provider="cpu", model_id=model_dir.name)
    state = ServerState()
    state.attach(svc)
    try:
        with LiveServer(create_app(state)) as url:
            client = _client(url)
            completions = [_complete(client, model_dir.name, p, n)[0] for p, n in JOBS]
            chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=12, temperature=0)
            return {"completions": completions, "chat": chat.choices[0].message.content}
    finally:
        svc.close()


@pytest.fixture(scope="module")
def cluster(model_dir, reference):
    """Two replicas on a local Ray cluster on 127.0.0.1, shut down whatever happens."""
    port = _free_port()
    ray.init(address="local", num_cpus=2, object_store_memory=200 << 20, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        options = ReplicaOptions(model=str(model_dir), threads=1, max_batch=4, provider="cpu")
        serve.run(build_app(options, Scaling(replicas=2, max_ongoing_requests=2)), name=APP, route_prefix="/",
                  logging_config={"log_level": "WARNING"})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _concurrent_round(url: str, model: str) -> tuple[list[str], set[str]]:
    """Each job twice, all eight at once (two in flight per replica at most): texts in job order, replicas."""
    client = _client(url)
    with ThreadPoolExecutor(2 * len(JOBS)) as pool:
        got = list(pool.map(lambda job: _complete(client, model, *job), JOBS * 2))
    texts = [t for t, _ in got]
    assert texts[:len(JOBS)] == texts[len(JOBS):]
    return texts[:len(JOBS)], {r for _, r in got}


def _running_replicas() -> int:
    return serve.status().applications[APP].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_two_replicas_answer_as_the_single_process_server(cluster, model_dir, reference):
    texts, replicas = _concurrent_round(cluster, model_dir.name)
    assert texts == reference["completions"]
    assert len(replicas) == 2 and None not in replicas, replicas
    client = _client(cluster)
    chat = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == reference["chat"]
    chunks = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["chat"]


@pytest.mark.slow
def test_a_conversation_stays_on_the_replica_holding_its_cache(cluster, model_dir):
    """X-Session-ID (serve/ray_router.py): both turns of each conversation reach one replica, whose
    prefix cache serves the second (cached_tokens > 0); ten conversations use both replicas."""
    import httpx

    seen: dict[str, set] = {}
    with httpx.Client(timeout=120) as http:
        for k in range(10):
            session, messages = f"conversation-{k}", [{"role": "user", "content": f"Tell me fact number {k} about foxes."}]
            for turn in range(2):
                r = http.post(cluster + "/v1/chat/completions", headers={"X-Session-ID": session},
                              json={"model": model_dir.name, "messages": messages, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                seen.setdefault(session, set()).add(r.headers[REPLICA_HEADER])
                messages = messages + [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                                       {"role": "user", "content": "Go on."}]
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, (r.json()["usage"], seen)
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set().union(*seen.values())) == 2


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_the_next_requests_succeed(cluster, model_dir, reference):
    import httpx

    body = {"model": model_dir.name, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", cluster + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        victim = resp.headers[REPLICA_HEADER]
        lines = resp.iter_lines()
        for _ in range(3):  # mid-run: the stream has started
            next(lines)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim)]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        with pytest.raises((httpx.HTTPError, StopIteration)):  # the stream breaks off; it never ends with [DONE]
            for line in lines:
                assert line != "data: [DONE]"

    # the next requests succeed (the survivor answers while Ray replaces the dead one) ...
    client = _client(cluster)
    for (prompt, n), want in zip(JOBS, reference["completions"]):
        text, replica = _complete(client, model_dir.name, prompt, n)
        assert text == want and replica != victim
    # ... and Ray brings the deployment back to two replicas, the new one serving the same answers
    deadline = time.monotonic() + 120
    while _running_replicas() < 2:
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    for _ in range(5):
        texts, replicas = _concurrent_round(cluster, model_dir.name)
        assert texts == reference["completions"]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2 and victim not in replicas, (victim, replicas)


@pytest.mark.slow
def test_a_replica_whose_folder_differs_fails_in_one_line(cluster, model_dir, reference, tmp_path):
    """A node's copy of the folder is checked against its manifest when the replica opens it."""
    import os
    import shutil

    from llama2_onnx.serve.ray_app import LlamaReplica

    bad = tmp_path / model_dir.name
    bad.mkdir()
    for f in model_dir.iterdir():
        try:
            os.link(f, bad / f.name)
        except OSError:
            shutil.copy(f, bad / f.name)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").write_text("{}")  # this node's copy is not the folder the manifest describes
    app = LlamaReplica.options(name="bad-copy", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
        ReplicaOptions(model=str(bad), threads=1))
    with pytest.raises(RuntimeError):
        serve.run(app, name="bad-copy", route_prefix="/bad")
    message = serve.status().applications["bad-copy"].deployments["bad-copy"].message
    assert "tokenizer.json is 2 bytes, the manifest says" in message
    serve.delete("bad-copy")
    # the good replicas kept serving
    assert _complete(_client(cluster), model_dir.name, *JOBS[0])[0] == reference["completions"][0]


def test_serve_bench_reports_what_ray_adds():
    from llama2_onnx.benchmarks.serve_bench import format_markdown, ray_overhead

    row = lambda mode, tps, ttft, tok: {"mode": mode, "clients": 1, "tokens_per_s": tps, "ttft_p50_ms": ttft,  # noqa: E731
                                        "ttft_p99_ms": ttft, "token_p50_ms": tok, "token_p99_ms": tok, "requests": 3}
    rows = [row("batching", 30.0, 200.0, 30.0), row("ray1", 27.0, 215.0, 32.5)]
    over = ray_overhead(rows, {"batching": 1.0, "ray1": 3.5})
    assert over == {"ray1": {"route_ms_added": 2.5, "ttft_p50_ms_added": 15.0, "token_p50_ms_added": 2.5, "tokens_per_s_x": 0.9}}
    text = format_markdown({"cpu": "x", "cores": 2, "prompt_len": 128, "new_tokens": 128, "requests_per_client": 3,
                            "rows": rows, "ratios": {}, "ray_overhead": over})
    assert "ray1 against batching: GET /v1/models 2.5 ms more" in text
