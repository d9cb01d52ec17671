"""airllm-rs from Python, with AirLLM's API.

Switching from AirLLM takes one changed import::

    from airllm_rs import AutoModel
    model = AutoModel.from_pretrained("meta-llama/Llama-3.1-70B", max_memory="4GiB")
    tokens = model.tokenizer(["What is the capital of France?"], return_tensors="pt")
    out = model.generate(tokens["input_ids"], max_new_tokens=20, return_dict_in_generate=True)
    print(model.tokenizer.decode(out.sequences[0]))

The weights stream from disk one slice at a time, under ``max_memory``; what the budget allows
stays resident (``model.plan`` shows the split). Sweeps run with the GIL released. Errors carry
the same one-line messages as the ``airllm`` command.
"""

import os

from ._airllm import (
    AirLLMError,
    BudgetError,
    DeviceError,
    InternalError,
    Model as _Model,
    TextStream,
    __version__,
    pull,
)

__all__ = [
    "AutoModel",
    "AirLLMModel",
    "Tokenizer",
    "GenerateOutput",
    "TextStream",
    "AirLLMError",
    "BudgetError",
    "DeviceError",
    "InternalError",
    "pull",
    "__version__",
]

# AirLLM's `compression` names, and the GGUF types they run as.
_COMPRESSION = {"4bit": "q4_k_m", "8bit": "q8_0"}

# AirLLM arguments that have nothing to do here: layers are read from the original files (no
# split copy to save or delete) and prefetching is always on.
_AIRLLM_IGNORED = {"layer_shards_saving_path", "profiling_mode", "prefetching", "delete_original"}


def _size(value, name):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    raise TypeError(f"{name} must be a size such as '4GiB' or a byte count, not {value!r}")


def _to_list(x):
    """A list (of lists) of ints from a list, tuple, numpy array or torch tensor."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return [_to_list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v for v in x]


def _rows(input_ids):
    ids = _to_list(input_ids)
    if ids and isinstance(ids[0], int):
        return [ids], True
    return ids, False


def _like(rows, template, single):
    """``rows`` in the form ``template`` came in: a torch tensor, a numpy array or lists."""
    mod = type(template).__module__.split(".")[0]
    if mod == "torch":
        import torch

        t = torch.tensor(rows, dtype=torch.long, device=template.device)
        return t[0] if single else t
    if mod == "numpy":
        import numpy as np

        a = np.asarray(rows, dtype=np.int64)
        return a[0] if single else a
    return rows[0] if single else rows


def _tensor(rows, kind):
    if kind is None:
        return rows
    if kind == "np":
        try:
            import numpy as np
        except ImportError as e:
            raise ImportError("return_tensors='np' needs numpy: pip install numpy") from e
        return np.asarray(rows, dtype=np.int64)
    if kind == "pt":
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                "return_tensors='pt' needs torch, which airllm-rs does not: pip install torch, or use return_tensors='np' or None"
            ) from e
        return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"return_tensors={kind!r}: expected 'pt', 'np' or None")


class Tokenizer:
    """The model's tokenizer, called as a transformers tokenizer is."""

    # Left padding, as generation wants; both can be set as in transformers.
    padding_side = "left"
    truncation_side = "right"

    def __init__(self, model):
        self._m = model

    @property
    def bos_token_id(self):
        return self._m.bos_token_id

    @property
    def eos_token_id(self):
        eos = self._m.eos_token_ids
        return eos[0] if eos else None

    @property
    def pad_token_id(self):
        # Left padding for generation; the pads are dropped again before the model sees them.
        eos = self.eos_token_id
        return 0 if eos is None else eos

    @property
    def vocab_size(self):
        return self._m.vocab_size

    def encode(self, text, add_special_tokens=True):
        return self._m.encode(text, add_special_tokens)

    def __call__(
        self,
        text,
        return_tensors=None,
        padding=False,
        truncation=False,
        max_length=None,
        add_special_tokens=True,
        return_attention_mask=True,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"unexpected tokenizer argument(s): {', '.join(sorted(kwargs))}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self._m.encode(t, add_special_tokens) for t in texts]
        if truncation:
            limit = max_length or self._m.max_seq_len
            rows = [r[:limit] if self.truncation_side == "right" else r[-limit:] for r in rows]
        longest = max((len(r) for r in rows), default=0)
        if padding == "max_length" and not max_length:
            raise ValueError("padding='max_length' needs max_length")
        if padding in (True, "longest", "max_length"):
            width = max(longest, max_length or 0) if padding == "max_length" else longest
            pads = [[self.pad_token_id] * (width - len(r)) for r in rows]
            zeros = [[0] * (width - len(r)) for r in rows]
            if self.padding_side == "left":
                masks = [z + [1] * len(r) for z, r in zip(zeros, rows)]
                rows = [p + r for p, r in zip(pads, rows)]
            else:
                masks = [[1] * len(r) + z for z, r in zip(zeros, rows)]
                rows = [r + p for p, r in zip(pads, rows)]
        else:
            if return_tensors is not None and len({len(r) for r in rows}) > 1:
                raise ValueError(
                    "the texts have different lengths: pass padding=True to make one tensor of them"
                )
            masks = [[1] * len(r) for r in rows]
        if single and return_tensors is None:
            rows, masks = rows[0], masks[0]
        out = {"input_ids": _tensor(rows, return_tensors)}
        if return_attention_mask:
            out["attention_mask"] = _tensor(masks, return_tensors)
        return out

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        return self._m.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs):
        return [self.decode(s, skip_special_tokens) for s in _to_list(sequences)]

    def apply_chat_template(
        self, messages, tokenize=True, add_generation_prompt=True, return_tensors=None, **kwargs
    ):
        """The conversation in the model's chat template, as text or token ids. The
        assistant's turn is always opened (``add_generation_prompt``)."""
        text = self._m.render_chat(_messages(messages))
        if not tokenize:
            return text
        ids = self._m.encode(text, False)
        return ids if return_tensors is None else _tensor([ids], return_tensors)


def _messages(messages):
    out = []
    for i, m in enumerate(messages):
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content'") from None
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}]: 'role' and 'content' must be strings")
        out.append((role, content))
    return out


class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns, as transformers does:
    ``sequences`` holds each prompt followed by its new tokens (padded to one length with
    ``pad_token_id``). Also: ``texts`` (the new text of each row) and ``finish_reasons``
    (``stop`` or ``length``)."""

    def __init__(self, sequences, texts, finish_reasons):
        self.sequences = sequences
        self.texts = texts
        self.finish_reasons = finish_reasons

    def __getitem__(self, key):
        return getattr(self, key)

    def __repr__(self):
        return f"GenerateOutput(sequences={self.sequences!r}, finish_reasons={self.finish_reasons!r})"


# transformers' defaults for the sampling settings generate() and stream() take.
_SAMPLING_DEFAULTS = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50, min_p=None,
                          repetition_penalty=1.0, stop=None, seed=None)


def _sampling(max_new_tokens, settings, caller):
    """The native call's settings from transformers-style keywords; unknown ones are refused."""
    unknown = set(settings) - set(_SAMPLING_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected {caller} argument(s): {', '.join(sorted(unknown))}")
    o = {**_SAMPLING_DEFAULTS, **settings}
    stop = [o["stop"]] if isinstance(o["stop"], str) else list(o["stop"] or [])
    return dict(
        max_new_tokens=int(max_new_tokens),
        # transformers' greedy search ignores temperature and the filters unless do_sample.
        temperature=float(o["temperature"]) if o["do_sample"] else 0.0,
        top_k=int(o["top_k"] or 0),
        top_p=float(o["top_p"]),
        min_p=float(o["min_p"] or 0.0),
        repetition_penalty=float(o["repetition_penalty"]),
        seed=o["seed"],
        stop=stop,
    )


class AirLLMModel:
    """A model that streams its layers under a memory budget. Make one with
    :meth:`AutoModel.from_pretrained`."""

    def __init__(self, native):
        self._m = native
        self.tokenizer = Tokenizer(native)

    @property
    def plan(self):
        """The memory plan: what stays resident, what streams, and the budget."""
        return self._m.plan

    @property
    def path(self):
        return self._m.path

    @property
    def architecture(self):
        return self._m.architecture

    @property
    def max_seq_len(self):
        return self._m.max_seq_len

    def generate(
        self,
        input_ids,
        max_new_tokens=20,
        attention_mask=None,
        return_dict_in_generate=False,
        use_cache=True,
        num_beams=1,
        pad_token_id=None,
        max_length=None,
        **sampling,
    ):
        """Generates for each row of ``input_ids`` (a list, numpy array or torch tensor; one
        row or a batch) in one batch, and returns the rows with their new tokens appended, in
        the input's form. Left padding marked by ``attention_mask`` is dropped before the
        model sees it. ``sampling``: ``do_sample`` (default False: greedy), ``temperature``,
        ``top_p``, ``top_k`` (50), ``min_p``, ``repetition_penalty``, ``seed``, and ``stop`` (a
        string or strings that end a row where its text appears). A row that ends with EOS
        keeps it, as in transformers; shorter rows are padded with ``pad_token_id`` (default:
        the tokenizer's). ``max_length`` counts the prompt, as in transformers, and overrides
        ``max_new_tokens``."""
        if num_beams != 1:
            raise ValueError("num_beams: beam search is not supported; use num_beams=1")
        rows, single = _rows(input_ids)
        if not rows:
            raise ValueError("input_ids: no rows")
        prompts = rows
        if attention_mask is not None:
            masks, _ = _rows(attention_mask)
            if len(masks) != len(rows) or any(len(m) != len(r) for m, r in zip(masks, rows)):
                raise ValueError("attention_mask: its shape is not input_ids' shape")
            prompts = [[t for t, k in zip(r, m) if k] for r, m in zip(rows, masks)]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("input_ids: a row has no tokens")
        if max_length is not None:
            max_new_tokens = max(max_length - max(len(r) for r in rows), 0)
        results = self._m.generate(prompts, _sampling(max_new_tokens, sampling, "generate"))
        new = [ids + ([] if eos is None else [eos]) for ids, eos, _, _ in results]
        width = max(len(n) for n in new)
        pad = self.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        seqs = [list(r) + n + [pad] * (width - len(n)) for r, n in zip(rows, new)]
        sequences = _like(seqs, input_ids, single)
        if not return_dict_in_generate:
            return sequences
        return GenerateOutput(sequences, [r[2] for r in results], [r[3] for r in results])

    def stream(self, prompt, max_new_tokens=128, **sampling):
        """Yields the text of a generation piece by piece. ``prompt`` is text (tokenized with
        BOS where the model wants it) or token ids; ``sampling`` as :meth:`generate` takes it."""
        ids = self._m.encode(prompt, True) if isinstance(prompt, str) else _rows(prompt)[0][0]
        return self._m.stream(ids, _sampling(max_new_tokens, sampling, "stream"))

    def chat(self, messages, stream=False, max_new_tokens=256, **kwargs):
        """The assistant's reply to ``messages`` (dicts with ``role`` and ``content``), through
        the model's chat template: its text, or with ``stream=True`` an iterator of pieces."""
        ids = self._m.encode(self._m.render_chat(_messages(messages)), False)
        pieces = self.stream(ids, max_new_tokens=max_new_tokens, **kwargs)
        return pieces if stream else "".join(pieces)

    def __repr__(self):
        return f"AirLLMModel({self.path!r}, {self.architecture})"


class AutoModel:
    """Opens a model as AirLLM's ``AutoModel`` does; the architecture comes from the model."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path=None,
        max_memory=None,
        device="cpu",
        compression=None,
        max_seq_len=None,
        gpu_memory=None,
        revision=None,
        hf_token=None,
        max_batch=1,
        batch_size=512,
        progress=True,
        **kwargs,
    ):
        """``pretrained_model_name_or_path``: a .gguf file, a Hugging Face folder, or a hub
        repo id (``ORG/NAME``, ``ORG/NAME:QUANT``, ``ORG/NAME/FILE.gguf``) fetched once into
        the HF cache; ``None`` for the default model. ``max_memory``: the budget ("4GiB" or
        bytes; default 90% of available memory). ``compression``: ``"4bit"`` (q4_k_m) or
        ``"8bit"`` (q8_0), converted once and cached. ``max_seq_len``: tokens per sequence
        (default min(2048, the model's)). ``max_batch``: sequences sharing a sweep; a larger
        batch waits its turn."""
        unknown = set(kwargs) - _AIRLLM_IGNORED
        if unknown:
            raise TypeError(f"unexpected from_pretrained argument(s): {', '.join(sorted(unknown))}")
        if compression and compression not in _COMPRESSION and compression not in ("q8_0", "q4_k", "q4_k_m"):
            raise ValueError(f"compression `{compression}`: expected 4bit or 8bit (or q8_0, q4_k, q4_k_m)")
        compress = _COMPRESSION.get(compression, compression) if compression else None
        # The token is read from the environment while the model is fetched, and only then.
        saved = os.environ.get("HF_TOKEN")
        if hf_token:
            os.environ["HF_TOKEN"] = hf_token
        try:
            native = _Model(
                None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path),
                max_memory=_size(max_memory, "max_memory"),
                device=device,
                gpu_memory=_size(gpu_memory, "gpu_memory"),
                compress=compress,
                max_seq_len=max_seq_len,
                max_batch=max_batch,
                batch_size=batch_size,
                revision=revision,
                progress=progress,
            )
        finally:
            if hf_token:
                if saved is None:
                    del os.environ["HF_TOKEN"]
                else:
                    os.environ["HF_TOKEN"] = saved
        return AirLLMModel(native)


class _ArchModel(AutoModel):
    """AirLLM's per-architecture classes, called as ``AirLLMLlama2("repo", ...)`` or through
    ``from_pretrained``; the architecture is read from the model either way."""

    def __new__(cls, *args, **kwargs):
        return AutoModel.from_pretrained(*args, **kwargs)


AirLLMLlama2 = type("AirLLMLlama2", (_ArchModel,), {})
AirLLMMistral = type("AirLLMMistral", (_ArchModel,), {})
AirLLMMixtral = type("AirLLMMixtral", (_ArchModel,), {})
AirLLMQWen = type("AirLLMQWen", (_ArchModel,), {})
AirLLMQWen2 = type("AirLLMQWen2", (_ArchModel,), {})
