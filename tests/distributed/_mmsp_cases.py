"""MM-SP through the whole tiny model in float64 on gloo ranks, against the single-process model.

Run by test_mmsp.py through `run_distributed`; results are plain floats and lists.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

LAYOUTS = {"u4r1": (4, 1), "u1r4": (1, 4), "u2r2": (2, 2), "dp2-u2r1": (2, 1)}
FRAMES = (5, 3, 0)


def tiny(seed=0):
    from longvila import LongVILA, LongVILAConfig, LongVILAProcessor

    torch.manual_seed(seed)
    model = LongVILA(LongVILAConfig.tiny()).double()
    return model, LongVILAProcessor.tiny()


def packed_batch(proc, seed: int, multiple: int, frames=FRAMES):
    rng = np.random.default_rng(seed)
    samples = []
    for i, count in enumerate(frames):
        video = rng.integers(0, 255, (max(count, 1), 32, 32, 3), dtype=np.uint8)
        if count:
            user = {"role": "user", "content": f"<video>\nWhat happens in clip {i}?"}
            sample = proc(
                [user, {"role": "assistant", "content": f"Answer {i} is red"}],
                videos=[video],
                num_frames=count,
            )
        else:
            sample = proc(
                [{"role": "user", "content": "Say a word."}, {"role": "assistant", "content": "blue"}]
            )
        samples.append(sample)
    batch = proc.collate(samples, pad_to_multiple_of=multiple)
    batch["pixel_values"] = batch["pixel_values"].double()
    return batch


def grads(model):
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Max abs difference relative to the reference's max magnitude, or to `floor` when that is larger.

    The floor (a thousandth of the largest reference value across the model) covers tensors whose exact
    value is zero: the key bias of softmax attention has an exactly zero gradient, so the reference holds
    only rounding noise (~1e-19), and AdamW turns that noise into ~1e-14 updates of a zero-initialised bias.
    """
    return float((a - b).abs().max() / b.abs().max().clamp_min(max(floor, 1e-30)))


def worst_rel(ours: dict, ref: dict) -> float:
    floor = 1e-3 * max(float(t.abs().max()) for t in ref.values())
    return max(rel(ours[k], ref[k], floor) for k in ref)


def loss_and_grads(sp_layout, rank):
    from longvila.parallel import init_sp

    out = {}
    for name, (ulysses, ring) in sp_layout.items():
        sp = init_sp(ulysses=ulysses, ring=ring)
        model, proc = tiny()
        batch = packed_batch(proc, seed=100 + sp.dp_rank, multiple=sp.sequence_multiple)
        ref = model(**batch)
        ref.loss.backward()
        ref_grads = grads(model)
        model.zero_grad(set_to_none=True)
        got = model(**batch, sp=sp)
        got.loss.backward()
        ours = grads(model)
        for tensor in ours.values():
            dist.all_reduce(tensor, group=sp.sp_group)
        worst = worst_rel(ours, ref_grads)
        vision = [k for k in ref_grads if k.startswith(("vision_tower", "mm_projector"))]
        out[name] = {
            "loss_rel": abs(got.loss.item() - ref.loss.item()) / abs(ref.loss.item()),
            "count": (got.num_supervised, ref.num_supervised),
            "grad_rel": worst,
            "vision_grad_rel": worst_rel({k: ours[k] for k in vision}, {k: ref_grads[k] for k in vision}),
            # The patch embedding and the projector must receive gradient from every frame's tokens.
            "vision_grad_nonzero": all(
                float(ref_grads[k].abs().max()) > 0
                for k in (
                    "vision_tower.model.embeddings.patch_embedding.weight",
                    "mm_projector.layers.2.weight",
                )
            ),
        }
    return out


def fewer_frames_than_ranks(rank):
    from longvila.parallel import init_sp

    sp = init_sp(ulysses=2, ring=2)
    model, proc = tiny()
    batch = packed_batch(proc, seed=7, multiple=sp.sequence_multiple, frames=(2, 0))
    ref = model(**batch).loss
    got = model(**batch, sp=sp)
    got.loss.backward()
    return {
        "loss_rel": abs(got.loss.item() - ref.item()) / abs(ref.item()),
        "local_frames": int(sp.split_frames(batch["pixel_values"]).shape[0]),
    }


def bad_layouts(rank):
    from longvila.parallel import init_sp

    errors = {}
    try:
        init_sp(ulysses=3, ring=1)
    except ValueError as exc:
        errors["world"] = str(exc)
    model, proc = tiny()
    model.llm.config.num_attention_heads = 6  # pretend: 6 query heads cannot split over 4 Ulysses ranks
    sp = init_sp(ulysses=4, ring=1)
    try:
        model(**packed_batch(proc, seed=1, multiple=8), sp=sp)
    except ValueError as exc:
        errors["heads"] = str(exc)
    model.llm.config.num_attention_heads = 4
    sp = init_sp(ulysses=2, ring=2)
    batch = packed_batch(proc, seed=1, multiple=1)
    if batch["input_ids"].shape[1] % 8 == 0:  # make the length not divisible
        batch = packed_batch(proc, seed=1, multiple=1, frames=(5, 3, 1))
    try:
        model(**batch, sp=sp)
    except ValueError as exc:
        errors["length"] = str(exc)
    return errors


def generation(rank, world_size):
    from longvila.parallel import init_sp

    layouts = {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2), (1, 4)]}[world_size]
    model, proc = tiny(seed=3)
    with torch.no_grad():  # larger weights than the default init, so greedy tokens vary step to step
        for param in model.llm.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3)
    video = np.random.default_rng(5).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    prompt = proc.collate(
        [
            proc(
                [{"role": "user", "content": "<video>\nWhat colour is the needle?"}],
                videos=[video],
                num_frames=6,
            )
        ]
    )
    ref = model.generate(**prompt, max_new_tokens=12, eos_token_id=[]).tolist()
    assert len(set(ref[0])) > 6, ref  # a degenerate repetition would make the comparison weak
    # The same prompt handed over as embeddings (as V-NIAH does), single process and under SP.
    with torch.no_grad():
        embeds = model.embed(prompt["input_ids"], prompt["pixel_values"])
    ref_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=12, eos_token_id=[]).tolist()
    results, from_embeds = {}, {}
    for ulysses, ring in layouts:
        sp = init_sp(ulysses=ulysses, ring=ring)
        results[f"u{ulysses}r{ring}"] = model.generate(
            **prompt, max_new_tokens=12, eos_token_id=[], sp=sp
        ).tolist()
        from_embeds[f"u{ulysses}r{ring}"] = model.generate(
            inputs_embeds=embeds, max_new_tokens=12, eos_token_id=[], sp=sp
        ).tolist()
    return {"ref": ref, "sp": results, "ref_embeds": ref_embeds, "sp_embeds": from_embeds}


def fsdp_step(rank):
    """One AdamW step with FSDP2 over dp 2 x sp 2 against one process on both batches together."""
    from longvila.parallel import init_sp
    from longvila.parallel.fsdp import fully_shard_model, global_loss_weight

    sp = init_sp(ulysses=2, ring=1)
    model, proc = tiny(seed=11)
    batches = [
        packed_batch(proc, seed=200 + d, multiple=sp.sequence_multiple, frames=(3 - d, 2)) for d in range(2)
    ]
    # Reference: the mean over every supervised token of both batches, one AdamW step.
    ref_model, _ = tiny(seed=11)
    outs = [ref_model(**b) for b in batches]
    total = sum(o.num_supervised for o in outs)
    loss = sum(o.loss * o.num_supervised for o in outs) / total
    loss.backward()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt.step()
    expected = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    fully_shard_model(model, model.llm.get_decoder().layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model(**batches[sp.dp_rank], sp=sp)
    (out.loss * global_loss_weight(out.num_supervised, sp)).backward()
    opt.step()
    got = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()
    }
    return {"param_rel": worst_rel(got, expected)}


def run_world4(rank, world_size):
    return {
        "loss_grads": loss_and_grads(LAYOUTS, rank),
        "few_frames": fewer_frames_than_ranks(rank),
        "bad": bad_layouts(rank),
        "generate": generation(rank, world_size),
        "fsdp": fsdp_step(rank),
    }


def run_world2(rank, world_size):
    return {"generate": generation(rank, world_size)}
