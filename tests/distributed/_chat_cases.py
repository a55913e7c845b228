"""`ChatSession` under MM-SP (float64 tiny model, gloo) against one process; run by test_chat_sp.py."""

from __future__ import annotations

import numpy as np
import torch


def chat_case(rank, world_size, layouts):
    from _models import lively_tiny_model

    from longvila import LongVILAProcessor
    from longvila.chat import ChatSession
    from longvila.parallel import init_sp

    model = lively_tiny_model(5).double()
    proc = LongVILAProcessor.tiny()
    video = np.random.default_rng(2).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)

    def conversation(sp=None, **sampling):
        session = ChatSession(model, proc, max_new_tokens=8, sp=sp, **sampling)
        streamed: list[str] = []
        first = session.ask("What happens?", video=video, stream=streamed.append)
        second = session.ask("And then?")  # a follow-up: the history and the video are in the prompt
        return [first, second], "".join(streamed)

    ref_greedy, _ = conversation()
    ref_sampled, _ = conversation(temperature=0.9, seed=11)
    results = {}
    for ulysses, ring in layouts:
        sp = init_sp(ulysses=ulysses, ring=ring)
        greedy, streamed = conversation(sp)
        sampled, _ = conversation(sp, temperature=0.9, seed=11)
        torch.manual_seed(1000 + rank)  # the ranks' own random streams now differ...
        unseeded, _ = conversation(sp, temperature=0.9)  # ...but rank 0 draws the seed and shares it
        results[f"u{ulysses}r{ring}"] = {
            "greedy": greedy,
            "streamed": streamed,
            "sampled": sampled,
            "unseeded": unseeded,
        }
    return {"ref_greedy": ref_greedy, "ref_sampled": ref_sampled, "sp": results}
