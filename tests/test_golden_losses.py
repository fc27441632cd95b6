"""Golden first losses: every method's first training losses and gradient norms, pinned.

Each case trains a tiny model for a few steps (fp32, CPU, one thread, fixed seeds) with the method's
own command and compares the loss and the gradient norm logged at every step with the values
recorded below (the gradient norm pins what a loss of exactly 0, as GRPO's first steps have, does
not). A refactor that moves code must leave them unchanged; a change that alters them alters what
the method computes, and must say so by updating the numbers in the same commit (as torchtune's
recipe tests pin theirs).

Floating-point sums differ in their last bits between processors (and PyTorch versions), so the
comparison is exact, to the last bit, only on the processor and PyTorch that recorded the values
(`RECORDED_ON`), and within a relative 1e-4 elsewhere. Before a refactor on another machine, record
there first:

    ORCHARD_RECORD_GOLDEN=1 python -m pytest tests/test_golden_losses.py -s

prints the table (and `RECORDED_ON`) to paste here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from orchard.cli.main import main
from untrusted import TINY_MODEL, write_corpus

STEPS = 5
COMMON = ["train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
          "train.progress=false", "train.seed=7"]
STUDENT_YAML = "hidden_size: 16\nintermediate_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\n" \
               "num_key_value_heads: 1\n"


def conversation_data(base) -> list[str]:
    return [f"init={base.dir}", "train.batch_size=4", "train.lr=5e-3", "train.warmup_steps=1",
            f"train.max_steps={STEPS}"]


def pairs(base) -> list[str]:
    return [f"init={base.dir}", f"data.path={base.pairs}", f"data.val_path={base.val_pairs}", "train.batch_size=4",
            "train.lr=1e-2", "train.warmup_steps=1", f"train.max_steps={STEPS}"]


def online(base) -> list[str]:
    return [f"init={base.dir}", "max_new_tokens=6", "data.max_prompts=16", "data.eval_prompts=4", "train.batch_size=2",
            "train.lr=1e-2", "train.warmup_steps=1", f"train.max_steps={STEPS}"]


def distillation(base) -> list[str]:
    return [str(base.dir), f"student={base.student}", f"data.path={base.world}", "data.seq_len=32", "top_k=8",
            "max_train_windows=24", "train.eval_batches=2", "train.batch_size=4", "train.lr=1e-2",
            "train.warmup_steps=1", f"train.max_steps={STEPS}"]


def continual(base) -> list[str]:
    return [f"init={base.dir}", "tasks=[arithmetic,facts-en]", "eval_items=2", "data.train_items=8",
            "data.max_length=96", "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.lr=1e-2",
            "peft.r=4", "ewc_batches=2", "replay_size=8"]


# name: (command, overrides given the shared files, the run directories whose losses are compared)
CASES = {
    "pretrain": ("pretrain", lambda b: [f"data.path={b.corpus}", *TINY_MODEL, f"train.max_steps={STEPS}"], ["."]),
    "pretrain-grown": ("pretrain", lambda b: [f"init={b.grown}", "init_trainable=new", f"data.path={b.corpus}",
                                               "data.seq_len=16", "train.batch_size=2", "train.lr=1e-2",
                                               f"train.max_steps={STEPS}"], ["."]),
    "sft": ("sft", conversation_data, ["."]),
    "sft-lora": ("sft", lambda b: [*conversation_data(b), "peft.method=lora", "peft.r=4"], ["."]),
    "sft-dora": ("sft", lambda b: [*conversation_data(b), "peft.method=dora", "peft.r=4"], ["."]),
    "sft-adapter": ("sft", lambda b: [*conversation_data(b), "peft.method=adapter"], ["."]),
    "sft-prefix": ("sft", lambda b: [*conversation_data(b), "peft.method=prefix"], ["."]),
    "reward": ("reward", pairs, ["."]),
    "dpo": ("dpo", lambda b: [*pairs(b), "loss=dpo"], ["."]),
    "ipo": ("dpo", lambda b: [*pairs(b), "loss=ipo"], ["."]),
    "simpo": ("dpo", lambda b: [*pairs(b), "loss=simpo", "beta=2"], ["."]),
    "orpo": ("dpo", lambda b: [*pairs(b), "loss=orpo"], ["."]),
    "kto": ("kto", lambda b: [f"init={b.dir}", "data.max_pairs=8", f"data.val_path={b.val_pairs}", "train.batch_size=4",
                              "train.lr=1e-2", "train.warmup_steps=1", f"train.max_steps={STEPS}"], ["."]),
    # Rewards that differ between the replies of a group, so the advantages (and gradients) are not all 0.
    "grpo": ("grpo", lambda b: [*online(b), "num_generations=4", "rewards=[length_penalty,single_line]"], ["."]),
    "ppo": ("ppo", online, ["."]),
    "distill-offline": ("distill", lambda b: [*distillation(b), "mode=offline"], ["."]),
    "distill-online": ("distill", lambda b: [*distillation(b), "mode=online", "hidden_weight=1.0"], ["."]),
    "distill-on-policy": ("distill", lambda b: [*distillation(b), "mode=on_policy", "lmbda=0.5"], ["."]),
    "distill-sequence": ("distill", lambda b: [str(b.dir), f"student={b.student}", "mode=sequence",
                                               "prompts.max_prompts=6", "prompts.eval_prompts=2",
                                               "samples_per_prompt=2", "max_new_tokens=5", "data.seq_len=128",
                                               "train.batch_size=2", "train.lr=1e-2", "train.warmup_steps=1",
                                               f"train.max_steps={STEPS}"], ["."]),
    "continual-naive": ("continual", lambda b: [*continual(b), "strategy=naive"], ["task-0-arithmetic",
                                                                                  "task-1-facts-en"]),
    "continual-replay": ("continual", lambda b: [*continual(b), "strategy=replay"], ["task-0-arithmetic",
                                                                                    "task-1-facts-en"]),
    "continual-ewc": ("continual", lambda b: [*continual(b), "strategy=ewc"], ["task-0-arithmetic",
                                                                              "task-1-facts-en"]),
    "continual-adapters": ("continual", lambda b: [*continual(b), "strategy=adapters"], ["task-0-arithmetic",
                                                                                        "task-1-facts-en"]),
}

RECORDED_ON = 'Intel(R) Xeon(R) Processor with AMX, torch 2.13.0+cpu'

GOLDEN: dict[str, list[float]] = {
    "pretrain": [
        5.6963396072387695, 1.7318079471588135, 5.7032999992370605, 1.779430627822876, 5.71619987487793,
        1.5192747116088867, 5.699191093444824, 1.8110995292663574, 5.700679302215576, 1.5870610475540161],
    "pretrain-grown": [
        5.692067623138428, 0.3682922422885895, 5.699601650238037, 0.37882000207901, 5.716325759887695,
        0.42303717136383057, 5.699061393737793, 0.31274962425231934, 5.700709342956543, 0.3035811483860016],
    "sft": [
        5.993802514963168, 0.6178208589553833, 5.889524137592751, 0.8166800737380981, 5.787533192152388,
        0.6183421611785889, 5.717272440592448, 0.6360526084899902, 5.6617153532608695, 0.6120397448539734],
    "sft-lora": [
        5.993802514963168, 0.12910312414169312, 5.985358808682934, 0.16392570734024048, 5.969358065601591,
        0.1376039981842041, 5.956845601399739, 0.17517836391925812, 5.965906929347826, 0.20844319462776184],
    "sft-dora": [
        5.993802514963168, 0.13359777629375458, 5.984950792843892, 0.1548471450805664, 5.970296223958333,
        0.1219850480556488, 5.95961062113444, 0.15154145658016205, 5.971437245244565, 0.1858842968940735],
    "sft-adapter": [
        5.993802514963168, 0.9718764424324036, 5.945135804616153, 0.35611411929130554, 5.959820122308052,
        0.10871927440166473, 5.938374837239583, 0.14577515423297882, 5.938819208559782, 0.0795958936214447],
    "sft-prefix": [
        5.993723832441298, 0.008272224105894566, 5.993662934325057, 0.008471904322504997, 5.984380029113998,
        0.005947718396782875, 5.981810251871745, 0.007688028737902641, 5.999181810461956, 0.008165853098034859],
    "reward": [
        0.6968342065811157, 0.21299080550670624, 0.6959654092788696, 0.27165651321411133, 0.6924417018890381,
        0.08143697679042816, 0.6924522519111633, 0.15747500956058502, 0.6309082508087158, 1.197791576385498],
    "dpo": [
        0.6931471824645996, 1.1156491041183472, 0.6794946193695068, 0.9359119534492493, 0.6834160089492798,
        0.6239303350448608, 0.7072184681892395, 1.3730231523513794, 0.5810452699661255, 1.108435034751892],
    "ipo": [
        25.0, 223.1298370361328, 23.39855194091797, 181.2335662841797, 23.8011474609375, 131.09628295898438,
        27.001684188842773, 283.30023193359375, 9.262673377990723, 138.97775268554688],
    "simpo": [
        0.9981167316436768, 1.5640193223953247, 1.000685691833496, 2.4721763134002686, 0.9466128945350647,
        1.3577684164047241, 0.935512363910675, 1.6908212900161743, 0.8672226071357727, 1.2726571559906006],
    "orpo": [
        6.05374813079834, 0.9386842846870422, 6.013813018798828, 2.1386911869049072, 6.005285739898682,
        1.4320095777511597, 5.71699333190918, 1.178768277168274, 5.855113506317139, 1.0685384273529053],
    "kto": [
        0.5, 0.5204064249992371, 0.5096373558044434, 0.5539078712463379, 0.4963035583496094, 0.4664515554904938,
        0.495749831199646, 0.2844873368740082, 0.4477563500404358, 0.3105398416519165],
    "grpo": [
        -1.4901161193847656e-08, 1.0167080163955688, 0.00012610852718353271, 0.9929060935974121, 0.00034305269946344197,
        0.5489338636398315, 0.0004200920229777694, 0.559352457523346, 0.0005871115135960281, 0.006933255586773157],
    "ppo": [
        0.0003020417837736507, 2.0668208599090576, 0.000819541901970903, 2.0488922595977783, 8.007380945075835e-05,
        2.434438705444336, 0.0007462334663917621, 1.9085460901260376, 5.594317917712033e-05, 1.6225911378860474],
    "distill-offline": [
        2.9969921112060547, 0.2745775580406189, 2.9913582801818848, 0.2638005018234253, 2.952155828475952,
        0.3039359450340271, 2.95149302482605, 0.3765072822570801, 2.9083774089813232, 0.37637463212013245],
    "distill-online": [
        4.931800842285156, 3.397733449935913, 4.58669376373291, 2.222177743911743, 4.275003910064697,
        1.9927374124526978, 4.208883762359619, 1.7025933265686035, 4.04424524307251, 1.392525553703308],
    "distill-on-policy": [
        0.009668429051676104, 0.005339210387319326, 3.0048301219940186, 0.2621214687824249, 0.007572445273399353,
        0.006072523072361946, 2.978922128677368, 0.32809528708457947, 2.9635117053985596, 0.31454163789749146],
    "distill-sequence": [
        6.002387737405711, 1.3388487100601196, 5.952377884476273, 1.3347065448760986, 5.792423642914871,
        1.5384842157363892, 5.7021660437950725, 1.213008999824524, 5.46795422097911, 1.608567714691162],
    "continual-naive": [
        5.989611943562825, 3.227936267852783, 5.737796020507813, 4.241052627563477, 5.362066541399274,
        3.1844935417175293, 5.7625274658203125, 1.4808837175369263, 5.70722126510908, 1.7491194009780884,
        5.504036127134811, 1.0601511001586914],
    "continual-replay": [
        5.989611943562825, 3.227936267852783, 5.737796020507813, 4.241052627563477, 5.362066541399274,
        3.1844935417175293, 5.7625274658203125, 1.4808837175369263, 5.2708587646484375, 3.84702730178833,
        5.592716660610465, 1.0978093147277832],
    "continual-ewc": [
        5.989611943562825, 3.227936267852783, 5.737796020507813, 4.241052627563477, 5.362066541399274,
        3.1844935417175293, 5.7625274658203125, 1.4808837175369263, 447.5934298523909, 10490.833984375,
        226.09476171585607, 5486.49169921875],
    "continual-adapters": [
        5.989611943562825, 0.6020036339759827, 5.937164688110352, 0.8036425709724426, 5.83696038382394,
        0.671082615852356, 5.976478754087936, 0.35682418942451477, 5.954839166605248, 0.31493380665779114,
        5.942789831826853, 0.3430075943470001],
}


def machine() -> str:
    """The processor model and the PyTorch version: what the last bits of a sum depend on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown processor")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return f"{model}{' with AMX' if ' amx_bf16' in flags else ''}, torch {torch.__version__}"


@pytest.fixture(scope="module")
def shared(chat_base, tmp_path_factory):
    """The files every case reads: conftest's tiny chat checkpoint and preference pairs, a text corpus,
    the built-in world's documents, a student config, and a grown copy of a tiny pretrained model."""
    from types import SimpleNamespace

    from orchard.data.synthetic import write_corpus as write_world

    root = tmp_path_factory.mktemp("golden")
    corpus = write_corpus(root / "corpus.txt")
    student = root / "student.yaml"
    student.write_text(STUDENT_YAML)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCHARD_CACHE", str(root / "cache"))
        assert main(["pretrain", f"out={root / 'small'}", f"data.path={corpus}", *TINY_MODEL, *COMMON,
                     "train.max_steps=2"]) == 0
        assert main(["grow", str(root / "small"), "--layers", "3", "--out", str(root / "grown")]) == 0
    return SimpleNamespace(dir=chat_base.dir, pairs=chat_base.pairs, val_pairs=chat_base.val_pairs, corpus=corpus,
                           world=write_world(root / "world.jsonl", 120, seed=0), student=student,
                           grown=root / "grown")


def losses(run_dir: Path) -> list[float]:
    """Each logged step's loss and gradient norm, in order."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for line in lines if "loss" in line for value in (line["loss"], line["grad_norm"])]


@pytest.mark.parametrize("name", list(CASES))
def test_first_losses_are_pinned(name, shared, tmp_path):
    command, overrides, runs = CASES[name]
    out = tmp_path / "run"
    assert main([command, *overrides(shared), *COMMON, f"out={out}"]) == 0
    found = [value for run in runs for value in losses(out / run)]
    if os.environ.get("ORCHARD_RECORD_GOLDEN"):
        print(f"\nRECORDED_ON = {machine()!r}\n    {name!r}: {found!r},")
        return
    if machine() == RECORDED_ON:
        assert found == GOLDEN[name]
    else:
        assert found == pytest.approx(GOLDEN[name], rel=1e-4, abs=1e-6)
