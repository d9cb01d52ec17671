"""The Python API against the CLI and AirLLM's usage, on tiny fixture models."""

import json
import textwrap
import threading
import time

import numpy as np
import pytest

import airllm_rs
from airllm_rs import AirLLMError, AutoModel, BudgetError
from conftest import BUDGET, CHAT_MODEL, GGUF, run_cli

PROMPT = "Once upon a time there was a little model"


@pytest.fixture(scope="module")
def model():
    return AutoModel.from_pretrained(str(CHAT_MODEL), max_memory=BUDGET, max_batch=2, max_seq_len=128,
                                     batch_size=32, progress=False)


def cli_greedy(airllm_bin, prompt, n):
    out = run_cli(airllm_bin, "run", "-m", str(CHAT_MODEL), "-p", prompt, "-n", str(n),
                  "--temperature", "0", "--json", "--max-memory", BUDGET).stdout
    return json.loads(out.splitlines()[0])


def test_plan_streams_under_the_budget(model):
    assert "budget 4.00 MiB" in model.plan, model.plan
    assert "streamed" in model.plan
    assert model.architecture == "Qwen3ForCausalLM"


def test_generate_gives_the_cli_greedy_tokens(model, airllm_bin):
    ref = cli_greedy(airllm_bin, PROMPT, 12)
    ids = model.tokenizer(PROMPT)["input_ids"]
    assert ids == ref["prompt_token_ids"]
    out = model.generate([ids], max_new_tokens=12, return_dict_in_generate=True)
    assert out.sequences[0] == ref["prompt_token_ids"] + ref["token_ids"]
    assert out.texts[0] == ref["text"]
    assert out.finish_reasons[0] == ref["finish_reason"]
    # One row in, one row out; numpy in, numpy out.
    flat = model.generate(ids, max_new_tokens=12)
    assert flat == ref["prompt_token_ids"] + ref["token_ids"]
    arr = model.generate(np.array([ids]), max_new_tokens=12)
    assert isinstance(arr, np.ndarray) and arr.tolist() == [flat]


def test_a_padded_batch_gives_each_row_its_own_tokens(model):
    prompts = [PROMPT, "The quick brown fox"]
    alone = [model.generate(model.tokenizer(p)["input_ids"], max_new_tokens=8) for p in prompts]
    enc = model.tokenizer(prompts, return_tensors="np", padding=True)
    assert enc["input_ids"].shape[0] == 2 and enc["attention_mask"][1, 0] == 0
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=8)
    width = enc["input_ids"].shape[1]
    for row, a, p in zip(out.tolist(), alone, prompts):
        n = len(model.tokenizer(p)["input_ids"])
        assert row[width:] == a[n:]


AIRLLM_SNIPPET = """
from airllm import AutoModel
model = AutoModel.from_pretrained("meta-llama/Llama-3.1-70B")
tokens = model.tokenizer(["What is the capital of France?"], return_tensors="pt")
out = model.generate(tokens["input_ids"], max_new_tokens=20, return_dict_in_generate=True)
print(model.tokenizer.decode(out.sequences[0]))
"""


def test_the_airllm_snippet_runs_with_the_import_and_path_changed(capsys):
    code = AIRLLM_SNIPPET.replace("from airllm import", "from airllm_rs import").replace(
        '"meta-llama/Llama-3.1-70B"', repr(str(CHAT_MODEL)))
    try:
        import torch  # noqa: F401
    except ImportError:
        # The test venv has no torch (a 2 GB install); numpy arrays take the tensors' place.
        code = code.replace('return_tensors="pt"', 'return_tensors="np"')
    exec(compile(code, "airllm_snippet", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("What is the capital of France?"), printed
    assert len(printed.strip()) > len("What is the capital of France?")


def test_pt_without_torch_says_what_to_install(model):
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs torch"):
        model.tokenizer(["x"], return_tensors="pt")


def test_stream_yields_the_generated_text(model):
    pieces = list(model.stream(PROMPT, max_new_tokens=12))
    assert len(pieces) > 1
    whole = model.generate(model.tokenizer(PROMPT)["input_ids"], max_new_tokens=12,
                           return_dict_in_generate=True)
    assert "".join(pieces) == whole.texts[0]
    s = model.stream(PROMPT, max_new_tokens=12)
    next(s)
    with pytest.raises(AirLLMError, match="still running"):
        model.generate([1, 2], max_new_tokens=1)
    s.close()
    model.generate([1, 2], max_new_tokens=1)


def test_chat_uses_the_template(model, airllm_bin):
    messages = [{"role": "user", "content": "Hello there"}]
    ref = json.load(open(CHAT_MODEL / "reference.json"))
    assert model.tokenizer.apply_chat_template(messages) == ref["chat_token_ids"]
    text = model.chat(messages, max_new_tokens=10)
    assert text == "".join(model.chat(messages, stream=True, max_new_tokens=10))
    cli = run_cli(airllm_bin, "run", "-m", str(CHAT_MODEL), "--chat", "-p", "Hello there", "-n", "10",
                  "--temperature", "0", "--json", "--max-memory", BUDGET).stdout
    assert text == json.loads(cli.splitlines()[0])["text"]


def test_sampling_repeats_with_a_seed(model):
    ids = model.tokenizer(PROMPT)["input_ids"]
    a = model.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, seed=7, max_new_tokens=10)
    b = model.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, seed=7, max_new_tokens=10)
    assert a == b
    others = {tuple(model.generate(ids, do_sample=True, temperature=0.9, seed=s, max_new_tokens=10))
              for s in range(8, 12)}
    greedy = tuple(model.generate(ids, max_new_tokens=10))
    assert len(others | {tuple(a), greedy}) > 2, "sampling does not depend on the seed"


def test_threads_share_a_model(model):
    prompts = [PROMPT, "The quick brown fox", "Hello there", "One two three"]
    alone = [model.generate(model.tokenizer(p)["input_ids"], max_new_tokens=8) for p in prompts]
    got = [None] * len(prompts)

    def work(i):
        got[i] = model.generate(model.tokenizer(prompts[i])["input_ids"], max_new_tokens=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone


def test_a_stream_closed_from_another_thread(model):
    s = model.stream(PROMPT, max_new_tokens=100)
    first = next(s)
    assert first
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() from another thread hung"
    rest = list(s)
    assert len(rest) < 99
    model.generate([1, 2], max_new_tokens=1)  # the model is free again


def test_airllm_architecture_classes_open_models():
    from airllm_rs import AirLLMLlama2

    m = AirLLMLlama2(str(CHAT_MODEL), max_memory=BUDGET, max_seq_len=64, batch_size=16, progress=False)
    assert m.architecture == "Qwen3ForCausalLM"


def test_the_gil_is_released_during_sweeps():
    # The default model (fetched by scripts/test.sh) prefilling ~1000 tokens in one sweep takes
    # long enough that a held GIL would stop this thread's loop for the whole sweep.
    try:
        m = AutoModel.from_pretrained(max_memory="512MiB", max_seq_len=1100, batch_size=1100, progress=False)
    except FileNotFoundError:
        pytest.skip("no default model: scripts/fetch_default_model.sh fetches it")
    ids = m.tokenizer(" ".join(["the quick brown fox jumps over the lazy dog"] * 110))["input_ids"][:1000]
    done = threading.Event()
    took = []

    def work():
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=1)
        took.append(time.perf_counter() - t)
        done.set()

    worker = threading.Thread(target=work)
    last, gap = time.perf_counter(), 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    worker.join()
    if took[0] < 0.2:
        pytest.skip(f"the sweep took only {took[0]:.3f} s: too short to tell")
    assert gap < 0.3 * took[0], f"this thread stalled {gap:.3f} s during a {took[0]:.3f} s sweep"


def test_bad_input_raises_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model `/no/such/model` not found: no such file or folder"):
        AutoModel.from_pretrained("/no/such/model", progress=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes((GGUF / "qwen3-q8_0.gguf").read_bytes()[:5000])
    with pytest.raises(AirLLMError) as e:
        AutoModel.from_pretrained(str(bad), progress=False)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="compression `3bit`: expected 4bit or 8bit"):
        AutoModel.from_pretrained(str(CHAT_MODEL), compression="3bit", progress=False)
    with pytest.raises(ValueError, match="max_memory `lots`: expected a size"):
        AutoModel.from_pretrained(str(CHAT_MODEL), max_memory="lots", progress=False)
    # The budget's own class, still an AirLLMError for callers that catch that.
    with pytest.raises(BudgetError, match="is below the minimum"):
        AutoModel.from_pretrained(str(CHAT_MODEL), max_memory="100KiB", progress=False)
    assert issubclass(BudgetError, AirLLMError)
    with pytest.raises(TypeError, match="unexpected from_pretrained argument"):
        AutoModel.from_pretrained(str(CHAT_MODEL), max_memroy="1GiB")


def test_bad_generate_arguments(model):
    with pytest.raises(ValueError, match="top_p 1.5 must be in"):
        model.generate([1, 2], do_sample=True, top_p=1.5)
    with pytest.raises(TypeError, match="unexpected generate argument"):
        model.generate([1, 2], max_new_tokenz=3)
    with pytest.raises(ValueError, match=r"^invalid argument: token id 1000000 is outside the embedding table of 320 rows$"):
        model.generate([1, 1000000], max_new_tokens=1)
    model.generate([1, 2], max_new_tokens=1)  # a failed batch leaves the model usable
    with pytest.raises(ValueError, match="input_ids: no rows"):
        model.generate([])
    assert 3 < len(model.generate([1, 2, 3], max_length=5, pad_token_id=0)) <= 5
    with pytest.raises(ValueError, match="a prompt of 5000 tokens does not fit the context size of 128"):
        model.generate([1] * 5000, max_new_tokens=1)


def test_compression_8bit_runs_a_cached_q8_0_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRLLM_CACHE_DIR", str(tmp_path))
    m = AutoModel.from_pretrained(str(CHAT_MODEL), compression="8bit", progress=False)
    assert m.path.endswith(".gguf") and m.path.startswith(str(tmp_path)), m.path
    out = m.generate(m.tokenizer(PROMPT)["input_ids"], max_new_tokens=4)
    assert len(out) == len(m.tokenizer(PROMPT)["input_ids"]) + 4


def test_version():
    assert airllm_rs.__version__
