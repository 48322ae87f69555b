"""A registered model outside tokenmill: pinned requirements, code that travels with it, the
scoring server, and models registered before the code travelled.

Tiny models with random weights and a small SentencePiece tokenizer stand in for trained ones,
registered as `tokenmill-lm` and `tokenmill-classifier` in a private SQLite registry. The
checks that matter run in other processes started from outside the repository, with a
`sitecustomize` that makes tokenmill's packages unimportable from this checkout (as in a
serving environment where tokenmill is not installed): a plain `load_model`, and `mlflow
models serve --env-manager local` answering real HTTP requests.

`fixtures/old_pyfunc/` holds the wrappers as commit 3efd973 logged them (no `code_paths`,
imports from `tasks`), so a test can log a model the old way and load it.
"""

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig
from tasks.core.shards import PAD_ID
from tasks.modeling.checkpoint import weights_sha256
from tasks.modeling.evaluation import Evaluation
from tasks.modeling.local_model import LocalModel
from tasks.modeling.pyfunc_io import bits_per_byte, complete, encode_texts
from tasks.registry import model_store
from tasks.registry.versions import register_candidate

from preprocess_helpers import small_tokenizer

REPO = Path(__file__).resolve().parents[2]
OLD_PYFUNC = Path(__file__).resolve().parents[1] / "fixtures" / "old_pyfunc"
LABELS = ["http", "json", "os"]
MAX_LEN, NORMALIZE = 16, "NFC"
SHAPES = {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 16}
PROMPTS = ["def main(", "import os\n"]
SCORED = "def add(a, b):\n    return a + b\n"
TEXTS = ["import json\njson.dumps({})", "os.getcwd()", ""]

# Installed first thing in every process the tests start (PYTHONPATH=<dir>/sitecustomize.py):
# tokenmill's packages import only from outside this checkout, as where tokenmill is not
# installed; `model` then has to come from the logged model's code/ directory.
SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.machinery, os, sys

    CHECKOUT = os.environ["TOKENMILL_CHECKOUT"] + os.sep
    OURS = {"tasks", "tokenmill", "flows", "data_catalog", "model"}

    class NotFromCheckout:
        def find_spec(self, name, path=None, target=None):
            if name not in OURS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or (spec.origin or "").startswith(CHECKOUT) or any(
                    p.startswith(CHECKOUT) for p in spec.submodule_search_locations or []):
                raise ModuleNotFoundError(f"No module named {name!r} (tokenmill is not installed here)", name=name)
            return spec

    sys.meta_path.insert(0, NotFromCheckout())
    """
)


@torch.no_grad()
def sharpened(net):
    """Random weights large enough that no two logits nearly tie: greedy decoding then picks
    the same tokens in every process, whatever its thread count."""
    for p in net.parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Tiny language model and classifier, registered by tokenmill as champions of a private registry."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("serving")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient()
    experiment = client.create_experiment("serving", artifact_location=(root / "mlartifacts").as_uri())
    tokenizer, tokenizer_sha, sp = small_tokenizer(root / "tok")
    manifest = root / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "corpus": {"fingerprint": "f" * 64},
                "row_len": MAX_LEN,
                "labels": LABELS,
                "config": {"data": {"normalize": NORMALIZE}},
                "tokenizer": {"path": str(tokenizer), "sha256": tokenizer_sha},
            }
        )
    )
    gpt_config = {"vocab_size": sp.get_piece_size(), **SHAPES}
    torch.manual_seed(0)
    lm = sharpened(GPT(GPTConfig(**gpt_config)).eval())
    clf = sharpened(GPTClassifier(GPTConfig(**gpt_config), len(LABELS), "mean").eval())
    env = {"root": root, "sp": sp, "lm": lm, "clf": clf, "manifest": manifest, "experiment": experiment}
    lm_eval = {"task": "lm", "metrics": {"val_bpb": 8.0}, "samples": [{"prompt": "def", "completion": " f"}]}
    clf_eval = {"task": "classify", "metrics": {"macro_f1": 0.3, "accuracy": 0.3}}
    for name, net, head, evaluation in (
        ("tokenmill-lm", lm, None, lm_eval),
        ("tokenmill-classifier", clf, {"labels": LABELS, "pooling": "mean"}, clf_eval),
    ):
        weights = root / f"{name}.pt"
        torch.save(net.state_dict(), weights)
        local = LocalModel(weights, tokenizer, gpt_config, tokenizer_sha, head)
        with mlflow.start_run(experiment_id=experiment) as run:
            pass
        scored = Evaluation(
            local,
            eval_set_sha256="e" * 64,
            eval_max_rows=1,
            weights_sha256=weights_sha256(net.state_dict()),
            **evaluation,
        )
        registration = register_candidate.fn(run.info.run_id, scored, manifest, "tiny", name, 0.005)
        assert registration.aliases == ["challenger", "champion"]
        env[name] = local
    yield env
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def outside_env(root: Path) -> dict[str, str]:
    """The environment of a process that cannot import tokenmill from this checkout."""
    site = root / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": str(site),
        "TOKENMILL_CHECKOUT": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_python(script: str, cwd: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=cwd, env=env, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_completions(registered, prompts, max_new_tokens):
    generator = torch.Generator().manual_seed(0)
    return [
        complete(registered["lm"], registered["sp"], p, max_new_tokens, 0.0, 50, generator, torch.device("cpu"))
        for p in prompts
    ]


@torch.no_grad()
def expected_probabilities(registered, texts):
    tokens, lengths = encode_texts(registered["sp"], texts, MAX_LEN, NORMALIZE, PAD_ID)
    logits, _ = registered["clf"](torch.from_numpy(tokens), torch.from_numpy(lengths))
    return torch.softmax(logits, dim=-1).tolist()


# ---------------------------------------------------------------- what is logged


def test_logged_model_pins_what_it_imports_and_carries_its_code(registered):
    import mlflow
    from mlflow.models import Model

    pins = model_store.requirements(["torch", "sentencepiece", "numpy", "mlflow", "pandas"])
    assert all("+" not in pin for pin in pins)  # torch 2.13.0+cpu pins as 2.13.0, which PyPI has
    for name, wanted in (("tokenmill-lm", pins[:4]), ("tokenmill-classifier", pins)):
        uri = f"models:/{name}@champion"
        assert Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split() == wanted
        root = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(registered["root"] / name)))
        pyfunc = Model.load(str(root)).flavors["python_function"]
        assert pyfunc["code"] == "code"
        assert (root / "code" / "model" / "gpt.py").is_file() and (root / "code" / "pyfunc_io.py").is_file()
        assert not list(root.rglob("__pycache__"))
        config = json.loads((root / pyfunc["artifacts"]["config"]["path"]).read_text())
        version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
        assert config["weights_sha256"] == version.tags["weights_sha256"]
        example = json.loads((root / "serving_input_example.json").read_text())
        if name == "tokenmill-lm":
            # Logging predicts the example once: a few new tokens keep registration quick.
            assert example == {"inputs": ["def main("], "params": {"max_new_tokens": 8}}
        else:
            assert len(example["inputs"]) == 1 and "params" not in example
            assert config["head"]["pad_id"] == PAD_ID


def test_wrappers_import_only_the_model_package_pyfunc_io_and_libraries():
    allowed = {
        "__future__",
        "json",
        "math",
        "unicodedata",
        "mlflow",
        "numpy",
        "pandas",
        "torch",
        "sentencepiece",
        "model",
        "pyfunc_io",
    }
    for path in (model_store.PYFUNC_CODE, model_store.CLASSIFIER_PYFUNC_CODE, model_store.PYFUNC_IO):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert {name.partition(".")[0] for name in names} <= allowed, path.name


# ---------------------------------------------------------------- where tokenmill is not installed


def test_registered_models_load_and_predict_where_tokenmill_cannot_be_imported(registered, tmp_path):
    script = f"""
        import importlib, json, os, sys
        for name in ("tasks", "tokenmill", "model"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"the import guard lets {{name}} in")
        import mlflow.pyfunc
        os.makedirs("lm"), os.makedirs("clf")
        lm = mlflow.pyfunc.load_model("models:/tokenmill-lm@champion", dst_path="lm")
        text = lm.predict({PROMPTS!r}, params={{"max_new_tokens": 6, "temperature": 0.0}})
        bpb = lm.predict([{SCORED!r}], params={{"mode": "score"}})
        clf = mlflow.pyfunc.load_model("models:/tokenmill-classifier@champion", dst_path="clf")
        out = clf.predict({TEXTS!r})
        import model, pyfunc_io
        checkout = {str(REPO)!r} + os.sep
        from_checkout = sorted(name for name, m in list(sys.modules.items())
                               if (getattr(m, "__file__", None) or "").startswith(checkout)
                               and not m.__file__.startswith(sys.prefix))
        print(json.dumps({{"text": list(text), "bpb": list(bpb), "rows": out.to_dict("records"),
                          "model": model.__file__, "pyfunc_io": pyfunc_io.__file__,
                          "from_checkout": from_checkout}}))
    """
    result = run_python(script, tmp_path, outside_env(tmp_path))
    assert result["from_checkout"] == []
    assert result["model"].startswith(str(tmp_path / "lm" / "code" / "model"))
    assert result["pyfunc_io"] == str(tmp_path / "lm" / "code" / "pyfunc_io.py")
    assert result["text"] == expected_completions(registered, PROMPTS, 6)
    assert result["bpb"][0] == pytest.approx(bits_per_byte(registered["lm"], registered["sp"], SCORED), rel=1e-4)
    expected = expected_probabilities(registered, TEXTS)
    for row, probs in zip(result["rows"], expected, strict=True):
        assert [row[f"p_{label}"] for label in LABELS] == pytest.approx(probs, abs=1e-5)
        assert row["label"] == LABELS[probs.index(max(probs))]


def test_models_logged_before_the_code_travelled_still_load_where_tokenmill_is_installed(registered, tmp_path):
    """Their wrappers import tasks.report.complete, tasks.pyfunc_io.texts_of, tasks.shards.PAD_ID."""
    import mlflow

    lm, clf = registered["tokenmill-lm"], registered["tokenmill-classifier"]
    config = {"gpt": lm.gpt_config, "tokenizer_sha256": lm.tokenizer_sha256, "manifest_sha256": "m" * 64}
    head = {"labels": LABELS, "pooling": "mean", "n_classes": len(LABELS), "max_len": MAX_LEN, "normalize": NORMALIZE}
    uris = {}
    with mlflow.start_run(experiment_id=registered["experiment"]):
        for name, local, conf, signature in (
            ("lm", lm, config, model_store.model_signature()),
            ("classifier", clf, {**config, "head": head}, model_store.classifier_signature(LABELS)),
        ):
            (tmp_path / f"{name}.json").write_text(json.dumps(conf))
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(OLD_PYFUNC / f"{name}_pyfunc.py"),
                signature=signature,
                artifacts={
                    "weights": str(local.weights),
                    "tokenizer": str(local.tokenizer),
                    "config": str(tmp_path / f"{name}.json"),
                },
                pip_requirements=["tokenmill", "torch", "sentencepiece", "numpy", "mlflow"],
            )
            uris[name] = info.model_uri
    script = f"""
        import json, mlflow.pyfunc
        lm = mlflow.pyfunc.load_model({uris["lm"]!r})
        text = lm.predict({PROMPTS!r}, params={{"max_new_tokens": 6, "temperature": 0.0}})
        out = mlflow.pyfunc.load_model({uris["classifier"]!r}).predict({TEXTS!r})
        print(json.dumps({{"text": list(text), "rows": out.to_dict("records")}}))
    """
    result = run_python(script, tmp_path, dict(os.environ))
    assert result["text"] == expected_completions(registered, PROMPTS, 6)
    for row, probs in zip(result["rows"], expected_probabilities(registered, TEXTS), strict=True):
        assert [row[f"p_{label}"] for label in LABELS] == pytest.approx(probs, abs=1e-5)


# ---------------------------------------------------------------- the scoring server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = cwd / f"serve-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no answer from {url}/ping within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The server and the uvicorn it started: the session `start_server` made for them."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # uvicorn may outlive the CLI for a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def invoke(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_scoring_server_generates_scores_and_classifies(registered, tmp_path):
    env = outside_env(tmp_path)
    servers = []
    try:
        for name in ("tokenmill-lm", "tokenmill-classifier"):  # both start at once: half the wait
            servers.append(start_server(f"models:/{name}@champion", tmp_path, env))
        for proc, url, log in servers:
            wait_ready(proc, url, log)
        lm_url, clf_url = servers[0][1], servers[1][1]

        status, reply = invoke(lm_url, {"inputs": PROMPTS, "params": {"max_new_tokens": 6, "temperature": 0.0}})
        assert status == 200, reply
        assert reply["predictions"] == expected_completions(registered, PROMPTS, 6)
        status, reply = invoke(lm_url, {"inputs": [SCORED], "params": {"mode": "score"}})
        assert status == 200, reply
        bpb = bits_per_byte(registered["lm"], registered["sp"], SCORED)
        assert reply["predictions"][0] == pytest.approx(bpb, rel=1e-4)
        status, reply = invoke(lm_url, {"inputs": PROMPTS, "params": {"mode": "scores"}})
        assert status >= 400 and "'generate' or 'score'" in json.dumps(reply)

        status, reply = invoke(clf_url, {"inputs": TEXTS})
        assert status == 200, reply
        rows = reply["predictions"]
        for row, probs in zip(rows, expected_probabilities(registered, TEXTS), strict=True):
            assert [row[f"p_{label}"] for label in LABELS] == pytest.approx(probs, abs=1e-5)
            assert row["label"] == LABELS[probs.index(max(probs))]
    finally:
        for proc, _, _ in servers:
            stop(proc)
