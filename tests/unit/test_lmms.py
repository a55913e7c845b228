"""The lmms-eval adapter: `lmms-eval --model longvila` end to end on a two-question local task."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# lmms-eval is part of our locked setup (requirements/no-deps.txt); without it (a user's own environment)
# these tests skip. Installed but broken (a dependency it cannot import) is a failure, not a skip.
if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed (make setup installs it)", allow_module_level=True)

from _models import lively_tiny_model

from longvila import LongVILA, LongVILAProcessor  # noqa: E402
from longvila.data.synthetic import write_mp4 as write_video  # noqa: E402
from longvila.eval.letters import build_prompt  # noqa: E402
from longvila.eval.videoqa import COLOURS  # noqa: E402

TASK_DIR = Path(__file__).resolve().parents[1] / "assets" / "lmms_task"
MAX_NEW_TOKENS = 16  # the task's generation_kwargs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    lively_tiny_model().save_pretrained(root / "model", processor=LongVILAProcessor.tiny())
    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        frames = np.empty((6, 64, 64, 3), dtype=np.uint8)
        frames[:] = COLOURS[name]
        noise = rng.integers(-10, 11, frames.shape)
        write_video(root / "media" / f"{name}.mp4", np.clip(frames + noise, 0, 255).astype(np.uint8))
    docs = [json.loads(line) for line in (TASK_DIR / "data.jsonl").read_text().splitlines()]
    return root, docs


def direct_answers(root, docs, num_frames=4):
    model = LongVILA.from_pretrained(root / "model").eval()
    processor = LongVILAProcessor.from_pretrained(root / "model")
    answers = []
    for doc in docs:
        content = [
            {"type": "video", "video": str(root / "media" / doc["video"])},
            {"type": "text", "text": build_prompt(doc["question"], doc["options"])},
        ]
        sample = processor([{"role": "user", "content": content}], num_frames=num_frames)
        new_ids = model.generate(
            **processor.collate([sample]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
        answers.append(processor.decode(new_ids[0]))
    return answers


def plugin_path(root: Path) -> str:
    """Until longvila's own metadata declares the entry point, a stand-in distribution declares it."""
    if any(
        ep.name == "longvila" and ep.value.startswith("longvila.")
        for ep in entry_points(group="lmms_eval.models")
    ):
        return ""
    info = root / "plugin" / "longvila_lmms_plugin-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: longvila-lmms-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[lmms_eval.models]\nlongvila = longvila.eval.lmms_adapter:lmms_manifest\n"
    )
    return str(info.parent)


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
ERROR_LINE = re.compile(r"(Traceback|Error|Exception)\b")


def lmms_results_file(out_dir: Path, result: subprocess.CompletedProcess) -> Path:
    """The run's one results file; else fail saying why lmms-eval wrote none.

    lmms-eval catches some failures (an import error inside the evaluator, a task that does not load),
    prints them and still exits 0: a missing results file is how such a run shows.
    """
    found = sorted(out_dir.rglob("*_results.json"))
    if len(found) == 1:
        return found[0]
    output = ANSI_COLOUR.sub("", result.stdout + result.stderr)
    errors = [line.strip() for line in output.splitlines() if ERROR_LINE.search(line)]
    cause = (
        "\n".join(errors[-8:]) if errors else "(no error line printed; last output below)\n" + output[-2000:]
    )
    pytest.fail(
        f"lmms-eval exited {result.returncode} but wrote {len(found)} results files under {out_dir} "
        f"(expected 1). What it printed about errors:\n{cause}"
    )


def test_lmms_eval_runs_the_local_task(setup):
    root, docs = setup
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (plugin_path(root), os.environ.get("PYTHONPATH", "")) if p),
        "LONGVILA_LMMS_MEDIA": str(root / "media"),
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        *(sys.executable, "-m", "lmms_eval"),
        *("--model", "longvila", "--model_args", f"pretrained={root / 'model'},num_frames=4"),
        *("--tasks", "longvila_tiny_videoqa", "--include_path", str(TASK_DIR)),
        *("--output_path", str(root / "out"), "--batch_size", "1", "--log_samples"),
    ]
    result = subprocess.run(command, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results_file = lmms_results_file(root / "out", result)
    results = json.loads(results_file.read_text())["results"]["longvila_tiny_videoqa"]
    assert 0.0 <= results["accuracy,none"] <= 1.0
    (samples_file,) = (root / "out").rglob("*_samples_longvila_tiny_videoqa.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    replies = [
        s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        for s in samples
    ]
    want = direct_answers(root, docs)
    assert any(w.strip() for w in want)
    assert [r.strip() for r in replies] == [w.strip() for w in want]


def test_simple_adapter_directly(setup):
    from longvila.eval.lmms_adapter import LongVILALmms, lmms_manifest

    root, docs = setup
    manifest = lmms_manifest()
    assert manifest.model_id == "longvila" and manifest.simple_class_path.endswith("LongVILALmms")
    adapter = LongVILALmms(pretrained=str(root / "model"), num_frames=4)
    adapter.task_dict = {"tiny": {"test": docs}}
    visual = lambda doc: [str(root / "media" / doc["video"])]
    gen_kwargs = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": 0,
        "do_sample": False,
        "until": ["\n\n\n\n"],
    }
    requests = [
        SimpleNamespace(
            args=(build_prompt(d["question"], d["options"]), gen_kwargs, visual, i, "tiny", "test")
        )
        for i, d in enumerate(docs)
    ]
    answers = adapter.generate_until(requests)
    assert answers == [w.split("\n\n\n\n")[0] for w in direct_answers(root, docs)]
    with pytest.raises(NotImplementedError, match="generate_until"):
        adapter.loglikelihood(requests)
    with pytest.raises(NotImplementedError, match="multi-round"):
        adapter.generate_until_multi_round(requests)
