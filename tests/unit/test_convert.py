"""`longvila convert`: lossless round trips ours -> official -> ours and ours -> hf -> ours, atomic output."""

import json

import numpy as np
import pytest
import torch
from _layouts import official_projector_state, tiny_parts, write_split_layout

from longvila import LongVILA, LongVILAConfig, LongVILAProcessor
from longvila.cli import main

VARIANTS = [
    ("mlp_downsample", "column"),
    ("mlp_downsample", "row"),
    ("mlp_downsample_2x2_fix", "row"),
    ("mlp_downsample_3x3_fix", "row"),
]


def lively(kind: str, order: str, seed: int = 0) -> LongVILA:
    torch.manual_seed(seed)
    config = LongVILAConfig.tiny(projector_type=kind, projector_token_order=order, extra={"stage": 3})
    model = LongVILA(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim >= 2:
                weight.normal_(0, 0.3)
    return model


def processor_of(model: LongVILA, **kwargs) -> LongVILAProcessor:
    from longvila.text.tokenizer import load_tiny_tokenizer

    return LongVILAProcessor.from_config(model.config, load_tiny_tokenizer(), **kwargs)


def batch_for(proc, seed=0):
    video = np.random.default_rng(seed).integers(0, 255, (3, 40, 56, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": "<video>\nWhat?"}, {"role": "assistant", "content": "red"}]
    return proc.collate([proc(messages, videos=[video])])


def assert_same_model(a: LongVILA, b: LongVILA, proc_a, proc_b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ca, cb = a.config.to_dict(), b.config.to_dict()
    for key in ("projector_type", "projector_token_order", "vision_select_layer", "image_token_id", "extra"):
        assert ca[key] == cb[key], key
    for key in ("tokens_per_frame", "image_size", "image_mean", "image_std", "num_frames"):
        assert getattr(proc_a, key) == getattr(proc_b, key), key
    with torch.no_grad():
        la = a(**batch_for(proc_a), return_logits=True)
        lb = b(**batch_for(proc_b), return_logits=True)
    assert torch.equal(la.logits, lb.logits) and torch.equal(la.loss, lb.loss)


@pytest.mark.parametrize("kind,order", VARIANTS, ids=[f"{k}-{o}" for k, o in VARIANTS])
@pytest.mark.parametrize("via", ["official", "hf"])
def test_round_trip_through_a_foreign_layout_is_lossless(tmp_path, kind, order, via):
    model = lively(kind, order)
    proc = processor_of(model, num_frames=5)
    model.save_pretrained(tmp_path / "ours", processor=proc)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / via), "--to", via]) == 0
    foreign = LongVILA.from_pretrained(tmp_path / via).eval()
    assert_same_model(model, foreign, proc, LongVILAProcessor.from_pretrained(tmp_path / via))
    assert main(["convert", str(tmp_path / via), str(tmp_path / "back"), "--to", "longvila"]) == 0
    back = LongVILA.from_pretrained(tmp_path / "back").eval()
    assert_same_model(model, back, proc, LongVILAProcessor.from_pretrained(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "longvila"


def test_official_export_has_the_release_layout(tmp_path):
    model = lively("mlp_downsample_3x3_fix", "row")
    proc = processor_of(model)
    model.save_pretrained(tmp_path / "ours", processor=proc)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "off"), "--to", "official"]) == 0
    off = tmp_path / "off"
    top = json.loads((off / "config.json").read_text())
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample_3x3_fix"
    assert (
        json.loads((off / "mm_projector" / "config.json").read_text())["mm_projector_type"]
        == top["mm_projector_cfg"]["mm_projector_type"]
    )
    from safetensors import safe_open

    with safe_open(str(off / "mm_projector" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(official_projector_state("mlp_downsample_3x3_fix", 48, 64))
    with safe_open(str(off / "vision_tower" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())  # what transformers 4.x (VILA) reads
    assert (off / "llm" / "tokenizer.json").exists() and (
        off / "vision_tower" / "preprocessor_config.json"
    ).exists()


def test_released_layout_converts_to_ours_with_the_same_outputs(tmp_path):
    llm, vision, tokenizer = tiny_parts(56, 8)
    state = official_projector_state("mlp_downsample", 8, 32)
    src = write_split_layout(tmp_path / "src", llm, vision, state, tokenizer, "mlp_downsample", None)
    # no top config: the rule would guess; the user says row, and the converted checkpoint keeps it
    assert (
        main(["convert", str(src), str(tmp_path / "ours"), "--to", "longvila", "--projector-order", "row"])
        == 0
    )
    ours = LongVILA.from_pretrained(tmp_path / "ours").eval()
    direct = LongVILA.from_pretrained(src, projector_order="row").eval()
    assert ours.config.projector_token_order == "row"
    # Our format records the processor's stop ids as the generate default; the released layout has none.
    stop_ids = LongVILAProcessor.from_pretrained(src).stop_token_ids
    assert ours.config.extra.pop("eos_token_id") == stop_ids
    assert_same_model(
        direct,
        ours,
        LongVILAProcessor.from_pretrained(src),
        LongVILAProcessor.from_pretrained(tmp_path / "ours"),
    )


def test_convert_refuses_to_overwrite_and_reports_bad_input(tmp_path, capsys):
    model = lively("mlp_downsample", "column")
    model.save_pretrained(tmp_path / "ours", processor=LongVILAProcessor.tiny())
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "taken"), "--to", "hf"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "taken"), "--to", "hf", "--force"]) == 0
    assert json.loads((tmp_path / "taken" / "config.json").read_text())["model_type"] == "nvila"
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "hf"]) == 1
    (tmp_path / "junk").mkdir()
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "x"), "--to", "hf"]) == 1
    assert "not a known checkpoint layout" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("to", ["official", "hf", "longvila"])
def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, to):
    model = lively("mlp_downsample", "row")
    model.save_pretrained(tmp_path / "ours", processor=LongVILAProcessor.tiny())
    import longvila.model.checkpoint as ck

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        main(["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", to])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_saving_with_a_processor_of_another_layout_fails(tmp_path):
    model = lively("mlp_downsample_3x3_fix", "row")
    with pytest.raises(ValueError, match="16 tokens per 64 px frame but the model 9"):
        model.save_pretrained(tmp_path / "x", processor=LongVILAProcessor.tiny())
    assert not (tmp_path / "x").exists()


def test_projector_order_flag_where_checkpoints_are_loaded():
    import argparse
    import importlib

    for name in ("ask", "serve", "convert"):
        parser = argparse.ArgumentParser()
        importlib.import_module(f"longvila.commands.{name}").add_arguments(parser)
        needed = {
            "ask": ["clip.mp4", "q", "--model", "m"],
            "serve": ["--model", "m"],
            "convert": ["a", "b", "--to", "hf"],
        }
        assert parser.parse_args([*needed[name], "--projector-order", "row"]).projector_order == "row"
        with pytest.raises(SystemExit):
            parser.parse_args([*needed[name], "--projector-order", "diagonal"])


def test_keep_writes_the_stored_dtype_and_dtype_casts(tmp_path):
    from safetensors import safe_open

    model = lively("mlp_downsample", "row").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ours", processor=processor_of(model))
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "longvila"]) == 0
    back = LongVILA.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ours"),
                str(tmp_path / "f32"),
                "--to",
                "official",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "f32" / "mm_projector" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
