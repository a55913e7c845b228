"""Build the tiny byte-level BPE tokenizer shipped in src/longvila/assets/tiny_tokenizer/.

Run once by a developer (`python scripts/build_tiny_tokenizer.py`); the output is committed. The corpus is
generated here, deterministically, from the words the synthetic tasks and the chat layout use.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from longvila.text.tokenizer import SPECIAL_TOKENS

OUT = Path(__file__).resolve().parents[1] / "src" / "longvila" / "assets" / "tiny_tokenizer"

WORDS = """
the a an of in on at to from with and or is are was were be this that these those it its which what who
where when why how many much one two three four five six seven eight nine ten zero first second third last
video image frame frames clip clips scene scenes picture photo needle haystack colour color shape digit
number letter word passkey key pass remember answer question option options choose choice correct
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle star cross diamond ring bar stripe dot
describe caption summary summarize happens happened happening shows show shown appears appear see seen
begin beginning end ending middle before after then next during while later earlier time second seconds
minute minutes hour hours person people dog cat car ball man woman child runs walks moves jumps sits
left right top bottom center large small big little bright dark moving still background foreground
you are helpful assistant user system please give only letter given directly with option's from
yes no true false not none all some every each other same different more less most least than
""".split()


def corpus(seed: int = 0, lines: int = 20000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ","])
        out.append(sentence)
    out += [f"{letter}. {w}" for letter in "ABCDEFGH" for w in WORDS]
    return out


def main() -> None:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": 1048576,
        "clean_up_tokenization_spaces": False,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
