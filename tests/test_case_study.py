"""Case studies (``transcoders task study``), checked against computations that do not use the
module's code: the plain Hugging Face model with MLP hooks written here (every MLP its
transcoder plus the clean error node, edits applied to the encoded activations), PD by a
softmax here, brute-force single ablations, and summaries computed by hand.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from click.testing import CliRunner
from conftest import N_LAYERS, assert_one_line_error, build_tiny_model
from test_circuits_interventions import make_coders as interventions_coders
from test_cli_circuits import files  # noqa: F401  (the tiny Llama + random transcoders fixture)

from transcoders.circuits.case_report import summarize
from transcoders.circuits.case_study import CaseStudyError, FreePD, Variant, global_variant, greedy_select, study_prompt
from transcoders.cli import main
from transcoders.coders.coder import SparseCoder
from transcoders.models import adapter_for

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
TOKENS = torch.arange(3, 13)
CF = torch.tensor([3, 4, 5, 60, 61, 8, 70, 71, 72, 73])
PLUS, MINUS = [5, 9], [7, 11, 13]


def make_coders(n_layers: int) -> dict[int, SparseCoder]:
    """``test_circuits_interventions``' random float64 top-k coders with decoders scaled 3x:
    features that matter, so ablations move PD."""
    coders = interventions_coders(n_layers)
    for c in coders.values():
        c.W_dec.data.mul_(3.0)
    return coders


def pd_by_hand(logits: torch.Tensor) -> float:
    p = torch.softmax(logits[-1].double(), -1)
    return float(p[PLUS].sum() - p[MINUS].sum())


@torch.no_grad()
def mlp_io(model, tokens):
    """``{layer: (mlp_in [T, d], mlp_out [T, d])}`` of the plain model, by hooks."""
    rec = {}
    hs = []
    for i, b in enumerate(model.model.layers):
        hs.append(b.mlp.register_forward_hook(lambda _m, a, out, i=i: rec.__setitem__(i, (a[0][0], out[0]))))
    model(input_ids=tokens[None])
    for h in hs:
        h.remove()
    return rec


@torch.no_grad()
def replaced(model, coders, tokens, *, edit=None, errors_from=None, o_proj_hooks=()):
    """PD of the free replacement model, by hand: MLP ``l`` outputs ``decode(a') + error``, with
    ``a' = edit(layer, a)`` and the error node of the clean prompt (or of ``errors_from``)."""
    clean = mlp_io(model, tokens)
    err_src = clean if errors_from is None else mlp_io(model, errors_from)
    errors = {layer: y - coders[layer].decode(coders[layer].encode(x)) for layer, (x, y) in err_src.items()}
    hs = []
    for layer, block in enumerate(model.model.layers):
        def post(_m, args, _out, layer=layer):
            a = coders[layer].encode(args[0][0])
            if edit is not None:
                a = edit(layer, a.clone())
            return (coders[layer].decode(a) + errors[layer])[None]

        hs.append(block.mlp.register_forward_hook(post))
    for layer, fn in o_proj_hooks:
        hs.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(fn))
    logits = model(input_ids=tokens[None]).logits[0]
    for h in hs:
        h.remove()
    return pd_by_hand(logits)


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_model("llama", dtype=torch.float64)
    ad = adapter_for(model)
    coders = make_coders(ad.n_layers)
    fp = FreePD(ad, coders, TOKENS, PLUS, MINUS, CF)
    return model, ad, coders, fp


def _acts(model, coders, tokens):
    return {layer: coders[layer].encode(x) for layer, (x, _y) in mlp_io(model, tokens).items()}


def test_no_edit_is_the_model_and_counterfactual_prompt(setup):
    model, _ad, _coders, fp = setup
    with torch.no_grad():
        assert float(fp.pd([Variant()])[0]) == pytest.approx(pd_by_hand(model(input_ids=TOKENS[None]).logits[0]), abs=1e-10)
        assert fp.counterfactual_pd() == pytest.approx(pd_by_hand(model(input_ids=CF[None]).logits[0]), abs=1e-10)
    assert fp.differing_positions() == [3, 4, 6, 7, 8, 9]


def test_batched_variants_equal_hooked_runs(setup):
    model, _ad, coders, fp = setup
    cf_acts = _acts(model, coders, CF)
    active = fp.active_nodes()
    nodes = [n for n, _ in active[::7]][:5]
    variants = [Variant(nodes=nodes), Variant(positions=[4, 6]), Variant(nodes=nodes, mode="counterfactual"),
                Variant(patch_errors=True), Variant(positions=[3], mode="counterfactual", patch_errors=True)]

    def ablate_nodes(layer, a):
        for lay, p, f in nodes:
            if lay == layer:
                a[p, f] = 0
        return a

    def patch_nodes(layer, a):
        for lay, p, f in nodes:
            if lay == layer:
                a[p, f] = cf_acts[layer][p, f]
        return a

    def zero_pos(layer, a):
        a[[4, 6]] = 0
        return a

    def cf_pos3(layer, a):
        a[3] = cf_acts[layer][3]
        return a

    expected = [replaced(model, coders, TOKENS, edit=ablate_nodes), replaced(model, coders, TOKENS, edit=zero_pos),
                replaced(model, coders, TOKENS, edit=patch_nodes), replaced(model, coders, TOKENS, errors_from=CF),
                replaced(model, coders, TOKENS, edit=cf_pos3, errors_from=CF)]
    got = fp.pd(variants, batch_size=2)  # batches of 2 and a last batch of 1
    assert got.tolist() == pytest.approx(expected, abs=1e-10)
    assert len({round(x, 6) for x in expected}) == len(expected)  # the edits all differ


def test_head_patch_is_the_counterfactual_slice_at_the_last_position(setup):
    model, _ad, coders, fp = setup
    layer, head, d_head = 1, 2, D // 4
    rec = {}
    h = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: rec.__setitem__("z", a[0][0]))
    with torch.no_grad():
        model(input_ids=CF[None])
    h.remove()

    def patch(_m, args):
        z = args[0].clone()
        z[0, -1, head * d_head:(head + 1) * d_head] = rec["z"][-1, head * d_head:(head + 1) * d_head]
        return (z,)

    expected = replaced(model, coders, TOKENS, o_proj_hooks=[(layer, patch)])
    got = fp.pd([Variant(), Variant(heads=[(layer, head)])], batch_size=2)
    assert float(got[1]) == pytest.approx(expected, abs=1e-10)
    assert abs(float(got[1]) - float(got[0])) > 1e-6  # the patch moved PD


def test_first_order_estimate_is_the_derivative_of_scaling_a_node(setup):
    model, _ad, coders, fp = setup
    _, est = fp.first_order()
    active = fp.active_nodes()
    eps = 1e-4
    for (layer, p, f), _a in active[::11][:4]:
        def scaled(s, layer=layer, p=p, f=f):
            def edit(lay, a):
                if lay == layer:
                    a[p, f] = a[p, f] * (1 - s)
                return a
            return edit

        # central difference of PD as the node is scaled toward ablation (attention's float32
        # softmax limits the precision, hence the tolerance)
        up, down = (replaced(model, coders, TOKENS, edit=scaled(s)) for s in (eps, -eps))
        slope = (up - down) / (2 * eps)
        assert float(est[layer][p, f]) == pytest.approx(slope, rel=1e-2, abs=1e-3)
    inactive = torch.ones_like(est[0], dtype=torch.bool)
    inactive[fp.clean_acts[0] > 0] = False
    assert float(est[0][inactive].abs().max()) == 0.0


def test_greedy_first_pick_is_the_best_single_ablation_and_the_path_is_exact(setup):
    model, _ad, coders, fp = setup
    active = [n for n, _ in fp.active_nodes()]
    sel = greedy_select(fp, 3, n_candidates=len(active))

    def ablating(chosen):
        def edit(layer, a):
            for lay, p, f in chosen:
                if lay == layer:
                    a[p, f] = 0
            return a
        return edit

    brute = {n: replaced(model, coders, TOKENS, edit=ablating([n])) for n in active}
    best = min(brute, key=brute.get)
    assert sel.nodes[0] == best and sel.pd[1] == pytest.approx(brute[best], abs=1e-10)
    assert all(b < a for a, b in zip(sel.pd, sel.pd[1:]))
    assert sel.pd[-1] == pytest.approx(replaced(model, coders, TOKENS, edit=ablating(sel.nodes)), abs=1e-10)
    assert all(p != 0 for _, p, _ in sel.nodes)


def test_study_prompt_and_global_variant(setup):
    model, _ad, coders, fp = setup
    st = study_prompt(fp, n=3, n_candidates=8, seeds=(0, 1))
    assert st["n_active"] == sum(int((a[1:] > 0).sum()) for a in fp.clean_acts.values())
    assert st["n_at_differing"] == sum(int((a[fp.differing_positions()] > 0).sum()) for a in fp.clean_acts.values())
    assert st["pd"]["selected"] == pytest.approx(st["greedy_pd"][-1], abs=1e-12)
    assert st["pd"]["all_features_ablated"] == pytest.approx(
        replaced(model, coders, TOKENS, edit=lambda _l, a: torch.cat([a[:1], torch.zeros_like(a[1:])])), abs=1e-10)
    assert {"random_seed0", "random_seed1", "errors_counterfactual", "counterfactual_prompt",
            "top_heads_counterfactual"} <= set(st["pd"])
    assert len(st["head_effects"]) == N_LAYERS * 4
    layer, _, feat = st["selected"][0]
    v = global_variant(fp, [(layer, feat)])
    where = torch.nonzero(fp.clean_acts[layer][:, feat] > 0).flatten().tolist()
    assert sorted(v.nodes) == sorted((layer, p, feat) for p in where if p != 0)
    with pytest.raises(CaseStudyError, match="objective"):
        study_prompt(fp, objective="zero")


def test_counterfactual_of_another_length_is_refused(setup):
    _model, ad, coders, _fp = setup
    with pytest.raises(CaseStudyError, match="same positions"):
        FreePD(ad, coders, TOKENS, PLUS, MINUS, CF[:-1])


def test_summarize_by_hand():
    studies = [
        {"pd": {"clean": 0.6, "selected": 0.1, "random_seed0": 0.5, "random_seed1": 0.7, "errors_counterfactual": 0.4,
                "features_counterfactual": 0.2, "counterfactual_prompt": -0.4},
         "digit_mass": {"clean": 0.9, "selected": 0.8, "random_seed0": 0.9, "random_seed1": 0.9}},
        {"pd": {"clean": 0.2, "selected": -0.3, "random_seed0": 0.2, "random_seed1": 0.1, "errors_counterfactual": 0.2,
                "features_counterfactual": -0.1, "counterfactual_prompt": 0.0},
         "digit_mass": {"clean": 0.7, "selected": 0.6, "random_seed0": 0.7, "random_seed1": 0.7}},
    ]
    s = summarize(studies)
    rows = s["interventions"]
    assert rows["clean"]["mean_pd"] == pytest.approx(0.4)
    assert rows["selected"]["cut"] == pytest.approx((0.4 - (-0.1)) / 0.4)
    assert rows["selected"]["mean_digit_mass"] == pytest.approx(0.7)
    assert rows["random"]["n"] == 4 and rows["random"]["mean_pd"] == pytest.approx(0.375)
    assert rows["random"]["cut_by_seed"]["random_seed0"] == pytest.approx((0.4 - 0.35) / 0.4)
    assert rows["random"]["std_pd"] == pytest.approx(statistics.pstdev([0.5, 0.7, 0.2, 0.1]))
    assert s["error_share"] == pytest.approx((0.2 + 0.0) / (1.0 + 0.2))
    assert s["feature_share"] == pytest.approx((0.4 + 0.3) / 1.2)
    with pytest.raises(ValueError, match="no prompts"):
        summarize([])


# ------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def study_files(files, tmp_path_factory):  # noqa: F811
    """The tiny Llama and random transcoders of ``test_cli_circuits`` with a three-item task."""
    task = tmp_path_factory.mktemp("study") / "task.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "Fellow citizens of the Senate", "counterfactual": "Fellow citizens of the House",
         "target": "group:+#5,#9;-#7"},
        {"prompt": "The quick brown fox jumps", "counterfactual": "The quick brown dog jumps", "target": "diff:#9,#11"},
        {"prompt": "Fellow citizens of the House", "counterfactual": "Fellow citizens of the Senate",
         "target": "group:+#5;-#7,#11"},
    ]) + "\n")
    return {"model": files["model"], "run": files["run"], "task": task}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSCODERS_CACHE", str(tmp_path / "cache"))


def study(sf, out, *extra):
    return CliRunner().invoke(main, [str(a) for a in ("task", "study", sf["run"], sf["task"], "--model",
                                                      sf["model"], "--out", out, "--n-features", "2",
                                                      "--n-candidates", "16", "--seeds", "2", *extra)])


def test_cli_writes_the_study_and_refuses_to_replace_it(study_files, tmp_path):
    out = tmp_path / "study"
    result = study(study_files, out, "--select", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "study.json").read_text())
    assert len(report["studies"]) == 3 and report["n_select"] == 1
    assert [s["held_out"] for s in report["studies"]] == [False, True, True]
    assert all("global" in s["pd"] for s in report["studies"][1:]) and "global" not in report["studies"][0]["pd"]
    assert report["summary_held_out"]["n_prompts"] == 2
    chosen = {(layer, feat) for layer, _p, feat in report["studies"][0]["selected"]}
    assert chosen  # the selection prompt named features, and they are the task-wide ones
    assert {(d["layer"], d["feature"]) for d in report["global_features"]} == chosen
    md = (out / "study.md").read_text()
    assert "Held-out prompts (2)" in md and "Error nodes" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cut it by" in result.output

    again = study(study_files, out)
    assert_one_line_error(again, str(out / "study.json"), "--force")
    forced = study(study_files, out, "--force", "--limit", "2", "--objective", "counterfactual")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "study.json").read_text())["objective"] == "counterfactual"


def test_cli_names_a_counterfactual_of_another_length_before_any_study(study_files, tmp_path):
    task = tmp_path / "uneven.jsonl"
    lines = [study_files["task"].read_text().splitlines()[0],
             json.dumps({"prompt": "the state of the union is", "counterfactual": "the state of the nation is",
                         "target": "diff:#5,#7"})]
    task.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["task", "study", str(study_files["run"]), str(task), "--model", str(study_files["model"]),
                                       "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "task item 1", "same length")
    assert "1/2" not in result.output  # refused before the first prompt was studied


def test_cli_refuses_a_task_without_counterfactuals(study_files, tmp_path):
    task = tmp_path / "bare.jsonl"
    task.write_text('{"prompt": "the state of the union", "target": "diff:#5,#7"}\n' * 2)
    result = CliRunner().invoke(main, ["task", "study", str(study_files["run"]), str(task), "--model", str(study_files["model"]),
                                       "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "counterfactual")
    assert not (tmp_path / "o" / "study.json").exists()
