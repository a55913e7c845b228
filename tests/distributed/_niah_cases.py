"""V-NIAH under MM-SP (float64 tiny model, gloo) against the same sweep in one process.

Run by test_niah_sp.py through `run_distributed`; results are plain lists and floats.
"""

from __future__ import annotations

import numpy as np
import torch


def niah_case(rank, world_size, layouts, out_dir):
    from _models import lively_tiny_model

    from longvila import LongVILAProcessor
    from longvila.data.synthetic import COLOUR_NAMES, NEEDLE_QUESTION, needle_frame
    from longvila.eval.niah import PromptBuilder, encode_frames, insert_needle, run_niah
    from longvila.model.generation import last_position_logits
    from longvila.parallel import init_sp

    model = lively_tiny_model(7).double()
    proc = LongVILAProcessor.tiny()
    size = proc.image_size
    haystack = np.random.default_rng(3).integers(0, 255, (7, size, size, 3), dtype=np.uint8)
    needles = [
        {"image": needle_frame(c, size), "question": NEEDLE_QUESTION, "answer": c} for c in COLOUR_NAMES[:2]
    ]
    frames, depths = [3, 6], [0.0, 0.5, 1.0]
    ref = run_niah(model, proc, haystack, needles, frames, depths, max_new_tokens=6)
    ref_cells = [[n["generated"] for n in c["needles"]] for c in ref.cells]
    ref_tf = [[n["correct_teacher_forced"] for n in c["needles"]] for c in ref.cells]

    # Logits at the answer positions: the teacher-forced score's input, compared as numbers.
    builder = PromptBuilder(model, proc, NEEDLE_QUESTION)
    single_embeds = encode_frames(model, proc, haystack)
    needle = encode_frames(model, proc, needles[0]["image"][None])
    answer = torch.tensor(proc.tokenizer.encode("red herring", add_special_tokens=False))
    embeds = builder.embeds(insert_needle(single_embeds[:6], needle, 0.5), answer)
    ref_logits = last_position_logits(model, embeds, len(answer) + 1)

    results = {}
    for ulysses, ring in layouts:
        sp = init_sp(ulysses=ulysses, ring=ring)
        name = f"u{ulysses}r{ring}"
        grid = run_niah(
            model, proc, haystack, needles, frames, depths, out_dir / name, max_new_tokens=6, sp=sp
        )
        sp_embeds = encode_frames(model, proc, haystack, sp=sp)
        logits = last_position_logits(model, embeds, len(answer) + 1, sp=sp)
        results[name] = {
            "generated": [[n["generated"] for n in c["needles"]] for c in grid.cells],
            "teacher_forced": [[n["correct_teacher_forced"] for n in c["needles"]] for c in grid.cells],
            "accuracy": grid.accuracy,
            "haystack_rel": float((sp_embeds - single_embeds).abs().max() / single_embeds.abs().max()),
            "logits_rel": float((logits - ref_logits).abs().max() / ref_logits.abs().max()),
            "files": sorted(p.name for p in (out_dir / name / "cells").glob("*.json"))
            if (out_dir / name / "cells").is_dir()
            else [],
        }
        # A second run resumes every cell from the files (all ranks must agree to skip them).
        again = run_niah(
            model, proc, haystack, needles, frames, depths, out_dir / name, max_new_tokens=6, sp=sp
        )
        results[name]["resumed_equal"] = again.accuracy == grid.accuracy
    return {
        "ref_generated": ref_cells,
        "ref_teacher_forced": ref_tf,
        "ref_accuracy": ref.accuracy,
        "sp": results,
    }
