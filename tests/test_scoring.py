"""Labels, explanation prompts and scores of features (transcoders.features.labels/explain/scoring).

Metrics are checked against hand-computed cases and brute-force definitions written here; the
judges against a synthetic feature that fires exactly on the token " cat", and against a small
chat model (defined here) that works its answer out of the prompt it is sent.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transcoders.features.examples import Example
from transcoders.features.explain import explain, explanation_messages, parse_explanation
from transcoders.features.labels import UNCUED, Label, rule_predict, token_label
from transcoders.features.scoring import (
    LLMJudge,
    RuleJudge,
    Score,
    auroc,
    balanced_accuracy,
    detection_score,
    fuzzing_items,
    fuzzing_score,
    simulation_score,
    token_simulation_score,
    yes_probability,
)

# --------------------------------------------------------------------------- a synthetic feature

FILLER = [" the", " a", " sat", " on", " mat", " big", " small", " house", " ran", " and", " it", " was", "."]


def window(rng: random.Random, n: int, *, cats: int, dogs: int) -> list[str]:
    """``n`` filler tokens with ``cats`` " cat" and ``dogs`` " dog" tokens at random places."""
    tokens = [rng.choice(FILLER) for _ in range(n)]
    places = rng.sample(range(1, n), cats + dogs)
    for i in places[:cats]:
        tokens[i] = " cat"
    for i in places[cats:]:
        tokens[i] = " dog"
    return tokens


def cat_example(tokens: list[str], rng: random.Random, *, binary: bool = False) -> Example:
    """The feature: fires on exactly the " cat" tokens (1.0, or a random strength in [1, 5])."""
    acts = [(1.0 if binary else rng.uniform(1.0, 5.0)) if t == " cat" else 0.0 for t in tokens]
    kind = "top" if any(acts) else "random"
    center = acts.index(max(acts)) if any(acts) else len(tokens) // 2
    return Example(tokens, acts, kind=kind, center=center)


def cat_feature(seed: int = 0, n: int = 20, *, binary: bool = False) -> tuple[list[Example], list[Example]]:
    """``n`` activating and ``n`` silent windows; " dog" appears in exactly half of each set."""
    rng = random.Random(seed)
    act = [cat_example(window(rng, 12, cats=1 + i % 2, dogs=i % 2), rng, binary=binary) for i in range(n)]
    silent = [cat_example(window(rng, 12, cats=0, dogs=i % 2), rng, binary=binary) for i in range(n)]
    return act, silent


CAT = Label("' cat'", (" cat",))
DOG = Label("' dog'", (" dog",))


# --------------------------------------------------------------------------- metrics


def brute_auroc(p: Sequence[float], y: Sequence[int]) -> float:
    """Fraction of (positive, negative) pairs the positive wins, a tie counting half."""
    pos = [a for a, t in zip(p, y) if t == 1]
    neg = [a for a, t in zip(p, y) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_balanced_accuracy_hand_cases():
    assert balanced_accuracy([0.9, 0.2, 0.6, 0.4], [1, 1, 0, 0]) == 0.5  # half right in each class
    assert balanced_accuracy([0.9, 0.8, 0.1, 0.6], [1, 1, 0, 0]) == 0.75  # TPR 1, TNR 1/2
    # unbalanced classes: plain accuracy would be 4/5, balanced is (1 + 3/4) / 2
    assert balanced_accuracy([0.9, 0.1, 0.1, 0.1, 0.9], [1, 0, 0, 0, 0]) == 0.875
    # exactly 0.5 counts half right: positives (0.5 + 1) / 2, negatives 1
    assert balanced_accuracy([0.5, 0.9, 0.1], [1, 1, 0]) == 0.875
    assert balanced_accuracy([0.5] * 6, [1, 0, 1, 0, 0, 0]) == 0.5  # a judge that can't decide is at chance
    assert balanced_accuracy([0.0, 1.0], [1, 0]) == 0.0
    assert math.isnan(balanced_accuracy([0.9, 0.8], [1, 1]))
    with pytest.raises(ValueError):
        balanced_accuracy([0.1], [1, 0])


def test_auroc_hand_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the textbook example
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    # pairs: (.5 > .2) 1, (.5 = .5) 1/2, (.9 > .2) 1, (.9 > .5) 1 -> 3.5 / 4
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == 0.875
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(auroc([0.3, 0.4], [0, 0]))


scores = st.lists(
    st.tuples(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0, 1)), st.integers(0, 1)),
    min_size=2,
    max_size=40,
).filter(lambda pairs: 0 < sum(y for _, y in pairs) < len(pairs))


@settings(max_examples=200, deadline=None)
@given(pairs=scores)
def test_auroc_matches_pairwise_definition(pairs):
    p = [a for a, _ in pairs]
    y = [t for _, t in pairs]
    assert auroc(p, y) == pytest.approx(brute_auroc(p, y), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(pairs=scores, data=st.data())
def test_balanced_accuracy_is_order_free_and_in_range(pairs, data):
    p = [a for a, _ in pairs]
    y = [t for _, t in pairs]
    ba = balanced_accuracy(p, y)
    assert 0.0 <= ba <= 1.0
    shuffled = data.draw(st.permutations(pairs))
    assert balanced_accuracy([a for a, _ in shuffled], [t for _, t in shuffled]) == pytest.approx(ba, abs=1e-12)
    # against a direct numpy reading of the definition (> 0.5 positive, < 0.5 negative, = 0.5 half)
    pa, ya = np.array(p), np.array(y)
    said = np.where(pa > 0.5, 1.0, np.where(pa < 0.5, 0.0, 0.5))
    expected = (said[ya == 1].mean() + (1 - said[ya == 0]).mean()) / 2
    assert ba == pytest.approx(expected, abs=1e-12)


def test_score_to_dict_is_json_ready():
    s = Score.of([0.9, 0.7], [1, 1])
    d = s.to_dict()
    assert d["balanced_accuracy"] is None and d["auroc"] is None
    assert d["n_positive"] == 2 and d["n_negative"] == 0 and d["predictions"] == [0.9, 0.7]


def test_yes_probability_is_a_two_way_softmax():
    assert yes_probability({"Yes": math.log(0.3), "No": math.log(0.1)}) == pytest.approx(0.75)
    assert yes_probability({"Yes": -math.inf, "No": -math.inf}) == 0.5
    assert yes_probability({}) == 0.5
    assert yes_probability({"Yes": -math.inf, "No": -2.0}) == 0.0
    assert yes_probability({"Yes": -5.0}) == 1.0
    assert yes_probability({"Yes": -1000.0, "No": 0.0}) == pytest.approx(0.0, abs=1e-300)


# --------------------------------------------------------------------------- labels


def test_token_label_names_the_cat_token():
    act, _ = cat_feature()
    label = token_label(act, [(" meow", 3.0), (" purr", 2.0), (" bark", -1.0), (" fur", 0.5), (" tail", 0.1)])
    assert label.tokens == (" cat",)
    assert label.promotes == (" meow", " purr", " fur")  # positive effects only, strongest first, 3 of them
    assert label.text.startswith("' cat'") and "' meow', ' purr', ' fur'" in label.text
    assert token_label(act, [(" purr", 2.0), (" meow", 3.0)], max_tokens=1).promotes == (" meow",)


def test_token_label_ranks_by_activation_groups_spellings_and_finds_context():
    ex = [
        Example([" the", " Cat", " sat"], [0.0, 5.0, 0.0]),
        Example([" the", "cat", " ran"], [0.0, 4.0, 1.0]),
        Example([" a", " dog", " ran"], [0.0, 3.0, 0.0]),
        Example([" the", " dog"], [0.0, 2.0]),
        Example([" the", " bird"], [0.0, 0.5]),  # 0.5 < 10% of the cat's 9.0: left out
        Example([" x", " y"], [0.0, 0.0]),  # silent: ignored
    ]
    label = token_label(ex)
    assert [t.strip().casefold() for t in label.tokens] == ["cat", "dog"]  # 9.0 beats 5.0
    assert label.tokens[0] in (" Cat", "cat")  # a raw spelling is kept
    assert label.context == (" the",)  # 4 of 5 peaks follow " the"
    assert "after ' the'" in label.text
    # order of the examples does not matter
    assert token_label(list(reversed(ex))) == label
    assert token_label(ex[2:4]).context == ()  # " a" and " the" once each: no cue


def test_token_label_dead_feature():
    assert token_label([]).text == "dead"
    assert token_label([]).dead
    assert token_label([Example([" a", " b"], [0.0, 0.0])], [(" x", 1.0)]).tokens == ()


def test_rule_predict_matches_stripped_casefolded_and_rewards_the_cue():
    ex = Example([" the", " CAT", " a", "cat", " dog"], [0.0] * 5)
    assert rule_predict(CAT, ex) == [0.0, 1.0, 0.0, 1.0, 0.0]
    cued = Label("x", (" cat",), (" the",))
    assert rule_predict(cued, ex) == [0.0, 1.0, 0.0, UNCUED, 0.0]
    assert 0.5 < UNCUED < 1.0
    assert rule_predict(Label("dead"), ex) == [0.0] * 5


# --------------------------------------------------------------------------- rule judge


def test_rule_judge_detection_tells_cat_windows_apart():
    act, silent = cat_feature()
    label = token_label(act)
    s = detection_score(RuleJudge(label), label.text, act, silent)
    assert (s.balanced_accuracy, s.auroc) == (1.0, 1.0)
    assert (s.n_positive, s.n_negative) == (20, 20) and s.labels == [1] * 20 + [0] * 20
    # " dog" is in half of each set: exactly chance
    wrong = detection_score(RuleJudge(DOG), DOG.text, act, silent)
    assert wrong.balanced_accuracy == 0.5 and wrong.auroc == 0.5


def test_fuzzing_items_construction():
    act, silent = cat_feature()
    for non in (None, silent):
        examples, marks, labels = fuzzing_items(act, non, seed=3)
        assert labels.count(1) == labels.count(0) == len(act)
        pos = [(e, m) for e, m, y in zip(examples, marks, labels) if y == 1]
        neg = [(e, m) for e, m, y in zip(examples, marks, labels) if y == 0]
        for e, m in pos:  # correct: exactly the activating tokens
            assert m == [i for i, a in enumerate(e.acts) if a > 0]
        for e, m in neg:  # incorrect: only silent tokens are marked
            assert m and all(e.acts[i] == 0 for i in m) and len(set(m)) == len(m)
        # as many marks in total as the correct items have (each random item copies one count)
        assert sorted(len(m) for _, m in neg) == sorted(len(m) for _, m in pos)
        from_silent = sum(1 for e, _ in neg if not e.activating)
        assert from_silent == (0 if non is None else len(act) // 2)
    assert fuzzing_items(act, silent, seed=3) == fuzzing_items(act, silent, seed=3)
    assert fuzzing_items(act, silent, seed=3)[1] != fuzzing_items(act, silent, seed=4)[1]


def test_rule_judge_fuzzing_correct_marks_beat_random_marks():
    act, silent = cat_feature()
    s = fuzzing_score(RuleJudge(CAT), CAT.text, act, silent, seed=1)
    pos = [p for p, y in zip(s.predictions, s.labels) if y == 1]
    neg = [p for p, y in zip(s.predictions, s.labels) if y == 0]
    assert min(pos) > max(neg)
    assert (s.balanced_accuracy, s.auroc) == (1.0, 1.0)
    for seed in range(3):
        wrong = fuzzing_score(RuleJudge(DOG), DOG.text, act, silent, seed=seed)
        assert abs(wrong.balanced_accuracy - 0.5) <= 0.1
        assert wrong.auroc <= 0.6


def test_simulation_scores():
    act, silent = cat_feature(binary=True)
    assert token_simulation_score(CAT, act + silent) == pytest.approx(1.0)
    act, silent = cat_feature(seed=5)
    examples = act + silent
    # independently: per-token indicator of " cat" against the activations
    flat_pred = [1.0 if t == " cat" else 0.0 for e in examples for t in e.tokens]
    flat_true = [a for e in examples for a in e.acts]
    r = token_simulation_score(CAT, examples)
    assert r == pytest.approx(np.corrcoef(flat_pred, flat_true)[0, 1], abs=1e-9)
    assert 0.5 < r < 1.0  # right tokens, but the strength varies
    # per example: has a " cat" against the max activation
    per = simulation_score(RuleJudge(CAT), CAT.text, examples)
    expected = np.corrcoef([1.0 if " cat" in e.tokens else 0.0 for e in examples], [max(e.acts) for e in examples])[0, 1]
    assert per == pytest.approx(expected, abs=1e-9)
    # dog appears independently of the cats: near zero per token
    assert abs(token_simulation_score(DOG, examples)) < 0.2
    # a label that never fires predicts a constant: undefined
    assert math.isnan(token_simulation_score(Label("x", (" zebra",)), examples))
    assert math.isnan(simulation_score(RuleJudge(Label("dead")), "", examples))

    class Oracle:
        def predict(self, explanation, examples, *, marked=None):
            return [max(e.acts) / 5.0 for e in examples]

    assert simulation_score(Oracle(), "", examples) == pytest.approx(1.0)


# --------------------------------------------------------------------------- LLM judge


class KeywordChat:
    """A stand-in chat model that reads the judge's prompt: the explanation is one word, and it
    answers Yes when that word is in the text (detection) or in every marked span (fuzzing).
    It relies on the prompt's ``Explanation: ...`` and ``Text: ...`` lines and fails without them.
    """

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def chat(self, messages: list[dict], *, max_tokens: int = 200, temperature: float = 0.0) -> str:
        raise AssertionError("the judge only asks for choice log-probs")

    def choice_logprobs(self, messages: list[dict], choices: Sequence[str]) -> dict[str, float]:
        assert list(choices) == ["Yes", "No"]
        prompt = "\n".join(m["content"] for m in messages)
        self.prompts.append(prompt)
        found_expl = re.search(r"^Explanation: (.+)$", prompt, re.MULTILINE)
        found_text = re.search(r"^Text: (.+)$", prompt, re.MULTILINE)
        assert found_expl and found_text, prompt
        word, text = found_expl.group(1).strip().lower(), found_text.group(1).lower()
        spans = re.findall(r"<<(.*?)>>", text)
        hit = all(word in s for s in spans) if spans else word in re.findall(r"\w+", text)
        return {"Yes": 0.0, "No": -3.0} if hit else {"Yes": -3.0, "No": 0.0}


def test_llm_judge_detection_reads_explanation_and_example():
    act, silent = cat_feature()
    chat = KeywordChat()
    s = detection_score(LLMJudge(chat), "cat", act, silent)
    assert len(chat.prompts) == 40  # one request per example
    yes = 1 / (1 + math.exp(-3))
    assert s.predictions == pytest.approx([yes] * 20 + [1 - yes] * 20)
    assert (s.balanced_accuracy, s.auroc) == (1.0, 1.0)
    assert all(len(p) < 600 for p in chat.prompts)
    s = detection_score(LLMJudge(KeywordChat()), "dog", act, silent)
    assert s.balanced_accuracy == 0.5


def test_llm_judge_fuzzing_sees_the_marks():
    act, silent = cat_feature()
    chat = KeywordChat()
    s = fuzzing_score(LLMJudge(chat), "cat", act, silent, seed=2)
    assert len(chat.prompts) == 40
    assert (s.balanced_accuracy, s.auroc) == (1.0, 1.0)
    assert all("<<" in p.split("Text: ")[1].split("\n")[0] for p in chat.prompts)


def test_llm_judge_crops_long_windows_around_the_marks():
    tokens = [f" w{i}" for i in range(200)]
    acts = [0.0] * 200
    acts[150] = 1.0
    ex = Example(tokens, acts, center=150)
    chat = KeywordChat()
    LLMJudge(chat, window=32).predict("w150", [ex], marked=[[150]])
    LLMJudge(chat, window=32).predict("w150", [ex])
    for p in chat.prompts:
        assert "w150" in p.split("Text: ")[1] and " w100" not in p and " w190" not in p
    assert "<<w150>>" in chat.prompts[0] and "<<" not in chat.prompts[1].split("Text: ")[1].split("\n")[0]


# --------------------------------------------------------------------------- explanations


def test_explanation_messages_marks_activating_tokens():
    ex = Example(["The", " big", " cat", " sat", " down", "\n"], [0.0, 0.1, 2.0, 0.6, 0.0, 0.0])
    messages = explanation_messages([ex], [" meow"])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "The big <<cat sat>> down\\n" in user  # 0.6 >= 0.3 * 2.0 is merged, 0.1 is not marked
    assert "' meow'" in user
    with pytest.raises(ValueError):
        explanation_messages([Example(["a"], [0.0])])


def test_explanation_messages_stays_short():
    top = []
    for k in range(40):
        acts = [0.0] * 300
        acts[150] = 1.0 + k
        top.append(Example([f" w{i}" for i in range(300)], acts))
    user = explanation_messages(top, max_chars=1000)[1]["content"]
    assert len(user) <= 1000
    lines = [ln for ln in user.splitlines() if re.match(r"\d+\. ", ln)]
    assert 1 <= len(lines) <= 10
    for ln in lines:
        assert "<<w150>>" in ln and len(re.findall(r" w\d+", ln)) <= 24 - 1  # 24 tokens, one of them marked
        assert " w100" not in ln and " w180" not in ln
    assert lines[0].startswith("1. ")  # strongest first
    # one long example with huge tokens is cut to its line cap and still shown
    big = Example(["x" * 500, " y", "z" * 500], [0.0, 1.0, 0.0])
    user = explanation_messages([big])[1]["content"]
    assert "<<y>>" in user and len(user) < 600


def test_parse_explanation():
    assert parse_explanation('Explanation: "the word cat"') == "the word cat"
    assert parse_explanation("\n\n  - Answer: cats and kittens\nmore text") == "cats and kittens"
    assert parse_explanation("Explanation:\n'cat'") == "cat"
    assert parse_explanation("**Explanation:** <<cat>> tokens") == "cat tokens"
    assert parse_explanation("1. Mentions of animals") == "Mentions of animals"
    long = parse_explanation("word " * 100)
    assert len(long) <= 120 and long.endswith("word")
    with pytest.raises(ValueError, match=re.escape(repr(" \n  \n"))):
        parse_explanation(" \n  \n")
    with pytest.raises(ValueError):
        parse_explanation('Explanation: ""')


def test_explain_sends_the_prompt_and_parses_the_reply():
    seen = {}

    class Echo:
        def chat(self, messages, *, max_tokens=200, temperature=0.0):
            seen["messages"], seen["temperature"] = messages, temperature
            return 'Explanation: "the word cat"\nIt fires on cats.'

        def choice_logprobs(self, messages, choices):
            raise AssertionError

    act, _ = cat_feature()
    assert explain(Echo(), act, [" meow"], max_examples=3) == "the word cat"
    assert seen["temperature"] == 0.0
    assert seen["messages"][1]["content"].count("<<cat") >= 3
