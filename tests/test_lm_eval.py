"""`--model orchard` in lm-evaluation-harness scores and generates what `--model hf` does on the
same checkpoint exported to Hugging Face: a multiple-choice and a generation task written here (no
network), rolling log-likelihoods over several windows, chat templates, the plugin entry point and
`run_lm_eval_cli`."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness comes with the eval extra")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from orchard.checkpoint import save_checkpoint  # noqa: E402
from orchard.errors import OrchardError  # noqa: E402
from orchard.evaluation.harness import OrchardLM, run_lm_eval_cli  # noqa: E402
from orchard.interop.export import export_hf  # noqa: E402
from orchard.model import CausalLM, ModelConfig  # noqa: E402
from orchard.tokenizer import Tokenizer  # noqa: E402

# (question, choices, index of the answer); the model trains on the first seven only.
MULTIPLE_CHOICE = [
    ("What colour is the sky?", ["blue", "green", "red", "black"], 0),
    ("What colour is grass?", ["red", "green", "white", "blue"], 1),
    ("How many legs does a cat have?", ["two", "six", "four", "eight"], 2),
    ("What do bees make?", ["milk", "silk", "bread", "honey"], 3),
    ("Which animal barks?", ["dog", "fish", "owl", "cow"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which season is the coldest?", ["summer", "spring", "winter", "autumn"], 2),
    ("What do cows drink?", ["oil", "juice", "tea", "water"], 3),
    ("Which planet do we live on?", ["Earth", "Mars", "Venus", "Jupiter"], 0),
    ("What rises in the east?", ["the moon", "the sun", "the tide", "the river"], 1),
]
# (question, answer); the model trains on the first six only.
GENERATION = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is two plus two?", "four"),
    ("What colour is snow?", "white"),
    ("What do cats say?", "meow"),
    ("Which fruit is yellow?", "banana"),
    ("What is the opposite of hot?", "cold"),
    ("How many days are in a week?", "seven"),
]
TRAINED_MULTIPLE_CHOICE, TRAINED_GENERATION = 7, 6
POSITIONS = 64  # lm-eval's max_length for both models: the long text below spans three windows
LONG_TEXT = " ".join(f"Question: {q}\nAnswer: {a}" for q, a in GENERATION)
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is snow?"},
            {"role": "assistant", "content": "The answer is "}]
# A template that refuses system messages, as Gemma's and early Mistral's do.
NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                      "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOLERANCE = 1e-4


@pytest.fixture(autouse=True, scope="module")
def offline():
    """No network: huggingface_hub and datasets read these variables once, at import, into the
    constants their functions consult, so those are set too."""
    import datasets
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield


def training_texts() -> list[str]:
    return ([f"Question: {q}\nAnswer: {choices[answer]}\n" for q, choices, answer in
             MULTIPLE_CHOICE[:TRAINED_MULTIPLE_CHOICE]]
            + [f"Question: {q}\nAnswer: {a}\n" for q, a in GENERATION[:TRAINED_GENERATION]])


def trained_model(tokenizer: Tokenizer, steps: int = 60) -> CausalLM:
    """A 2-layer model fitted to the training texts for a few dozen full-batch steps: sure of
    what it saw, unsure of the held-out items, so scores and replies are not uniform noise."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    # The generation questions as chats too, so that --apply_chat_template gets answers, not silence.
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": f"Question: {q}\nAnswer:"},
                                            {"role": "assistant", "content": a}])
             for q, a in GENERATION[:TRAINED_GENERATION]]
    rows = [tokenizer.encode(text, add_eos=True) for text in training_texts() + chats]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = labels[i, :len(row)] = torch.tensor(row)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_tasks(directory, cache) -> None:
    """The two tasks as lm-eval YAML over local JSONL files, the datasets' cache kept in tmp."""
    directory.mkdir()
    (directory / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MULTIPLE_CHOICE))
    (directory / "gen.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": a}) + "\n" for q, a in GENERATION))

    def data(name: str) -> dict:
        return {"dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(directory / name)}, "cache_dir": str(cache)},
                "doc_to_text": "Question: {{question}}\nAnswer:"}

    (directory / "orchard_mc.yaml").write_text(yaml.safe_dump({
        "task": "orchard_mc", **data("mc.jsonl"), "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    (directory / "orchard_gen.yaml").write_text(yaml.safe_dump({
        "task": "orchard_gen", **data("gen.jsonl"), "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        # Replies start with the space after "Answer:".
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match"}]}))


def bos_adding(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with Llama's post-processor, which makes transformers' `encode` start with BOS."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_str(tokenizer._backend.to_str())
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return Tokenizer(backend)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The trained checkpoint and its Hugging Face export (`checkpoint`, `hf`), the same model with
    a tokenizer that adds BOS (`variants["bos"]`), and the task directory."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("lm-eval")
    tokenizer = Tokenizer.train(iter(training_texts() * 10), vocab_size=300)
    model = trained_model(tokenizer)
    variants = {}
    for name, variant in (("plain", tokenizer), ("bos", bos_adding(tokenizer))):
        checkpoint = save_checkpoint(root / name / "ckpt", model, variant, {"stage": "test"})
        variants[name] = (checkpoint, export_hf(checkpoint, root / name / "hf"))
    write_tasks(root / "tasks", root / "datasets-cache")
    return SimpleNamespace(checkpoint=variants["plain"][0], hf=variants["plain"][1], variants=variants,
                           tasks=root / "tasks")


def evaluate(world, model: str, model_args: str, **options) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["orchard_mc", "orchard_gen"], log_samples=True,
        task_manager=TaskManager(include_path=str(world.tasks), include_defaults=False), bootstrap_iters=0,
        **options)


@pytest.fixture(scope="module")
def evaluations(world) -> dict[str, dict]:
    return {"orchard": evaluate(world, "orchard", f"pretrained={world.checkpoint},device=cpu,batch_size=4"),
            "hf": evaluate(world, "hf", f"pretrained={world.hf},device=cpu,dtype=float32,batch_size=4")}


def both_models(world, variant: str = "plain", **options) -> tuple[OrchardLM, object]:
    """OrchardLM and lm-eval's own `hf` model on a checkpoint variant and its export."""
    checkpoint, hf = world.variants[variant]
    return (OrchardLM(pretrained=str(checkpoint), device="cpu", batch_size=4, **options),
            get_model("hf")(pretrained=str(hf), device="cpu", dtype="float32", batch_size=4, **options))


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_orchard_scores_and_generates_what_hf_does(evaluations):
    ours, theirs = evaluations["orchard"], evaluations["hf"]
    mc, gen = ours["results"]["orchard_mc"], ours["results"]["orchard_gen"]
    for metric in ("acc,none", "acc_norm,none"):
        assert mc[metric] == theirs["results"]["orchard_mc"][metric]
    assert gen["exact_match,strip"] == theirs["results"]["orchard_gen"]["exact_match,strip"]
    # The model learned its trained questions (multiple choice: 7 of 10, chance 0.25 on the others);
    # it cannot know the two held-out answers to generate.
    assert 0.7 <= mc["acc,none"] < 1.0
    assert gen["exact_match,strip"] == 6 / 8

    requests = 0
    for sample, reference in zip(samples(ours, "orchard_mc"), samples(theirs, "orchard_mc"), strict=True):
        assert sample["arguments"] == reference["arguments"]
        for [(log_prob, greedy)], [(expected, expected_greedy)] in zip(sample["resps"], reference["resps"],
                                                                       strict=True):
            assert log_prob == pytest.approx(expected, abs=TOLERANCE) and greedy == expected_greedy
            requests += 1
    assert requests == 4 * len(MULTIPLE_CHOICE)
    replies = [sample["resps"][0][0] for sample in samples(ours, "orchard_gen")]
    assert replies == [sample["resps"][0][0] for sample in samples(theirs, "orchard_gen")]
    assert replies[:2] == [" Paris", " Rome"]


@pytest.mark.parametrize("variant", ["plain", "bos"])
def test_requests_are_tokenised_scored_and_answered_as_hf(world, variant):
    """Each request type called directly, with and without a BOS-adding tokenizer: empty contexts,
    a context that writes its own BOS, a text longer than max_length (three rolling windows)."""
    ours, theirs = both_models(world, variant)
    bos = ours.tokenizer.bos_token
    pairs = [(f"Question: {q}\nAnswer:", f" {choice}") for q, choices, _ in MULTIPLE_CHOICE[:3] for choice in choices]
    pairs += [("", "Bees make honey."), (f"{bos}Question: What colour is snow?\nAnswer:", " white"),
              ("Question: What do cats say?\nAnswer: ", "meow")]  # the trailing space moves to the continuation
    texts = ["Question: What colour is snow?\nAnswer: white", "Bees make honey.", LONG_TEXT]
    assert len(ours.tok_encode(LONG_TEXT)) > 2 * POSITIONS
    assert (ours.tok_encode("Bees")[0] == ours.tokenizer.bos_id) == (variant == "bos")
    assert ours.tok_encode("Bees") == theirs.tok_encode("Bees")

    scores = ours.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                disable_tqdm=True)
    expected = theirs.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                    disable_tqdm=True)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=TOLERANCE)
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    assert scores[0][0] > -1 and scores[0][1]  # "blue", which the model learned

    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    log_likelihoods = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    # Sums over up to ~1,000 tokens: fp32 agrees to ~1e-7 of the sum (the order of additions varies by CPU).
    assert log_likelihoods == pytest.approx(theirs.loglikelihood_rolling(requests, disable_tqdm=True), rel=1e-6,
                                            abs=TOLERANCE)
    assert all(value < 0 for value in log_likelihoods)

    settings = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", settings), i)
                for i, (q, _) in enumerate(GENERATION[:3])]
    replies = ours.generate_until(requests, disable_tqdm=True)
    assert replies == theirs.generate_until(requests, disable_tqdm=True)
    assert replies[:2] == [" Paris", " Rome"]  # each stops before the "\n" that ends it


def test_prefix_token_id_precedes_rolling_windows_as_in_hf(world):
    """hf's prefix_token_id argument, which orchard takes too: EOS rather than BOS before each text
    (what orchard's pretraining puts between documents)."""
    default, _ = both_models(world)
    ours, theirs = both_models(world, prefix_token_id=default.eot_token_id)
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(["Bees make honey.",
                                                                                          LONG_TEXT])]
    log_likelihoods = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    # Sums over up to ~1,000 tokens: fp32 agrees to ~1e-7 of the sum (the order of additions varies by CPU).
    assert log_likelihoods == pytest.approx(theirs.loglikelihood_rolling(requests, disable_tqdm=True), rel=1e-6,
                                            abs=TOLERANCE)
    # Only the first token's context differs from the default's.
    first = default.loglikelihood_rolling(requests, disable_tqdm=True)
    assert log_likelihoods[0] != pytest.approx(first[0], abs=TOLERANCE)


def test_chat_template_renders_what_the_tokenizer_and_hf_render(world):
    ours, theirs = both_models(world)
    question = MESSAGES[:2]
    rendered = ours.apply_chat_template(question)
    assert rendered == ours.tokenizer.apply_chat_template(question, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(question)
    assert rendered.endswith("<|im_start|>assistant\n")
    # A task's gen_prefix: lm-eval asks for no generation prompt and the assistant's message stays open.
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=False) == \
        theirs.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("assistant\nThe answer is ")
    assert ours.chat_template(True) == ours.tokenizer.chat_template and ours.chat_template(False) is None

    name = ours.tokenizer_name
    ours.tokenizer.chat_template = theirs.tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    assert ours.tokenizer_name != name  # lm-eval's cache of rendered requests follows the template
    without_system = ours.apply_chat_template(question)  # tried again without the system message
    assert without_system == theirs.apply_chat_template(question)
    assert without_system == ours.apply_chat_template(question[1:])


def test_chat_template_path_matches_hf(world):
    """`--apply_chat_template`: the same rendered prompts, scores and replies as hf."""
    ours = evaluate(world, "orchard", f"pretrained={world.checkpoint},device=cpu,batch_size=4",
                    apply_chat_template=True)
    theirs = evaluate(world, "hf", f"pretrained={world.hf},device=cpu,dtype=float32,batch_size=4",
                      apply_chat_template=True)
    for task in ("orchard_mc", "orchard_gen"):
        for sample, reference in zip(samples(ours, task), samples(theirs, task), strict=True):
            assert sample["arguments"] == reference["arguments"]
            assert sample["arguments"][0][0].startswith("<|im_start|>user\nQuestion:")
            if task == "orchard_mc":
                assert [r[0][0] for r in sample["resps"]] == pytest.approx([r[0][0] for r in reference["resps"]],
                                                                           abs=TOLERANCE)
            else:
                assert sample["resps"] == reference["resps"]
    # The trained answers; orchard's replies end at <|im_end|>, hf's at the "\n" after it.
    replies = [sample["resps"][0][0] for sample in samples(ours, "orchard_gen")]
    assert replies[:TRAINED_GENERATION] == [a for _, a in GENERATION[:TRAINED_GENERATION]]


def test_arguments_as_lm_eval_passes_them(world):
    """--model_args come as strings or numbers; --batch_size auto is max_batch_size, else 16."""
    args = f"pretrained={world.checkpoint},device=cpu"
    lm = OrchardLM.create_from_arg_string(f"{args},max_gen_toks=8", {"batch_size": "auto", "max_batch_size": 8})
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks) == (8, POSITIONS, 8)
    assert OrchardLM.create_from_arg_string(args, {"batch_size": "auto:4"}).batch_size == 16
    assert OrchardLM.create_from_arg_string(args, {"batch_size": "2"}).batch_size == 2
    for wrong in ("batch_size=0", "max_length=65", "precision=fp16"):
        with pytest.raises(OrchardError, match=wrong.split("=")[0]):
            OrchardLM.create_from_arg_string(f"{args},{wrong}")


def test_sampled_replies_repeat_under_the_torch_seed(world, caplog):
    """lm-eval seeds torch (--seed); each sampled request draws its own seed from it."""
    lm, _ = both_models(world)
    settings = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 3.0, "top_k": 5}
    requests = [Instance("generate_until", {}, ("Question: What is the capital of Italy?\nAnswer:", settings), i)
                for i in range(4)]
    torch.manual_seed(1234)
    replies = lm.generate_until(requests, disable_tqdm=True)
    torch.manual_seed(1234)
    assert lm.generate_until(requests, disable_tqdm=True) == replies
    assert len(set(replies)) > 1  # four seeds, four samples at temperature 3
    assert "top_k" in caplog.text  # which the engine has no equivalent of
    # An empty stop string, which would end every reply at once, is left out.
    greedy = {"until": ["", "\n"], "max_gen_toks": 8, "do_sample": False}
    assert lm.generate_until([Instance("generate_until", {}, (requests[0].args[0], greedy), 0)],
                             disable_tqdm=True) == [" Rome"]


def test_entry_point_names_the_model_class():
    (entry_point,) = [e for e in importlib.metadata.entry_points(group="lm_eval.models") if e.name == "orchard"]
    assert entry_point.load() is OrchardLM
    assert get_model("orchard") is OrchardLM


def test_cli_writes_the_accuracy_simple_evaluate_computes(world, evaluations, tmp_path, monkeypatch):
    # lm-eval's command line indexes its ~15,000 built-in tasks first (13 s here): the test's own will do.
    class OwnTasksOnly(TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OwnTasksOnly)
    code = run_lm_eval_cli(["run", "--model", "orchard", "--model_args", f"pretrained={world.checkpoint}",
                            "--device", "cpu", "--batch_size", "4", "--tasks", "orchard_mc",
                            "--include_path", str(world.tasks), "--output_path", str(tmp_path / "out")])
    assert code == 0
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())["results"]["orchard_mc"]
    assert results["acc,none"] == evaluations["orchard"]["results"]["orchard_mc"]["acc,none"]
    assert run_lm_eval_cli(["run", "--model", "orchard", "--no-such-flag"]) == 2  # argparse's usage error
