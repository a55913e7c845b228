"""Dataset builders that run models (above `model/` in the layering): the long-video SFT captioner and
writer (`build/long_sft.py`). Their pure data side (prompts, validation, caching, sharding) is
`longvila.data.long_sft`."""
