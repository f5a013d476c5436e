"""toy/exact.py: the exact likelihood of the random-order sampler (a DP over revealed sets) against
plain enumeration, and the estimator comparison built on it."""

import itertools
import math

import pytest
import torch

from maskgrpo import MaskedDiffusionLM, ModelConfig
from toy.exact import (
    ESTIMATORS,
    all_completions,
    completion_distribution,
    estimator_table,
    exact_logprob,
    exact_logprobs,
    log_ratio_estimate,
    make_policies,
    mask_draws,
    plot_estimators,
    sample_random_order,
    single_completion,
    subset_logps,
    total_variation,
    toy_completions,
)

VOCAB, EOS, MASK = 5, 3, 4  # content tokens 0..2
COLUMNS = slice(0, 3)
PROMPT = torch.tensor([0, 1])


def sharp_model(seed, std=0.5):
    """A random model with large weights, so pi(o_i | x_S) depends strongly on which tokens are revealed."""
    cfg = ModelConfig.tiny(VOCAB, MASK, EOS, d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32, max_sequence_length=16)
    g = torch.Generator().manual_seed(seed)
    model = MaskedDiffusionLM(cfg, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std, generator=g).requires_grad_(False)
    return model.eval()


def perturbed(model, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    other = MaskedDiffusionLM(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std).requires_grad_(False)
    return other.eval()


@torch.no_grad()
def brute_force(model, prompt, completion, columns):
    """Every unmasking order, written out: returns log P (any order), E_order log P_order, log P_LR."""
    P, L = len(prompt), len(completion)
    per_order = []
    for order in itertools.permutations(range(L)):  # the identity order comes first
        x = torch.cat([prompt, torch.full((L,), model.config.mask_token_id)])
        logp = 0.0
        for i in order:
            logits = model(x[None], columns=columns)[0, P + i].double()
            logp += float(logits.log_softmax(-1)[completion[i] - columns.start])
            x[P + i] = completion[i]
        per_order.append(logp)
    per_order = torch.tensor(per_order, dtype=torch.float64)
    # P(o) = sum_sigma (1/L!) prod_k pi(...): the uniform order has probability 1/L!
    return float(per_order.logsumexp(0) - math.log(math.factorial(L))), float(per_order.mean()), float(per_order[0])


def test_exact_probabilities_sum_to_one():
    model = sharp_model(0)
    for length in (1, 3):
        _, probs = completion_distribution(model, PROMPT, length, COLUMNS)  # all 3^L completions
        assert len(probs) == 3 ** length
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)


def test_exact_matches_enumeration_of_every_order():
    model = sharp_model(1)
    completions = all_completions(3, 3)[[0, 5, 13, 26]]  # a few of the 27, including (0,0,0) and (2,2,2)
    for length, comps in ((3, completions), (4, torch.tensor([[2, 0, 1, 1], [0, 2, 2, 1]]))):
        for completion in comps:
            exact = exact_logprobs(model, single_completion(PROMPT, completion, COLUMNS))
            any_order, elbo, left_to_right = brute_force(model, PROMPT, completion, COLUMNS)
            assert float(exact["any_order"][0]) == pytest.approx(any_order, abs=2e-5), (length, completion)
            assert float(exact["elbo"][0]) == pytest.approx(elbo, abs=2e-5)
            assert float(exact["left_to_right"][0]) == pytest.approx(left_to_right, abs=2e-5)
            assert elbo <= any_order + 1e-9  # Jensen
    # the order matters for this model, so the comparisons above are not vacuous
    assert abs(any_order - left_to_right) > 1e-2 and abs(any_order - elbo) > 1e-3


def test_length_one_is_the_all_masked_prediction():
    model = sharp_model(2)
    for token in range(3):
        x = torch.tensor([[*PROMPT.tolist(), MASK]])
        expected = float(model(x, columns=COLUMNS)[0, -1].log_softmax(-1)[token])
        assert exact_logprob(model, PROMPT, torch.tensor([token]), COLUMNS) == pytest.approx(expected, abs=1e-6)


def test_random_order_sampler_has_the_exact_distribution():
    model = sharp_model(3)
    tokens, probs = completion_distribution(model, PROMPT, 3, COLUMNS)
    g = torch.Generator().manual_seed(0)
    n = 20000
    samples = sample_random_order(model, PROMPT.expand(n, -1), 3, g, COLUMNS)[:, 2:]
    # sampling noise alone gives E[TV] <= 0.5 * sum_o sqrt(2 P(o) / (pi n)) ~ 0.015 here
    assert total_variation(samples, tokens, probs) < 0.03
    assert float(probs.max()) > 0.1  # the distribution is far from uniform (1/27)


def test_elbo_estimator_is_unbiased_for_the_exact_elbo_difference():
    old = sharp_model(4)
    new = perturbed(old, 5)
    batch = single_completion(PROMPT, torch.tensor([1, 1, 0]), COLUMNS)  # one whose ELBO and log P differ
    raw, t = mask_draws(new, old, batch, "elbo", "random", draws=20000, num_iterations=1, min_mask_rate=0.6,
                        p_mask_prompt=0.15, generator=torch.Generator().manual_seed(0))
    est = (raw / t).flatten()  # (1/t) sum_{i in M} [log pi_new - log pi_old], t ~ U(eps, 1]
    exact_new, exact_old = exact_logprobs(new, batch), exact_logprobs(old, batch)
    elbo_delta = float(exact_new["elbo"] - exact_old["elbo"])
    log_p_delta = float(exact_new["any_order"] - exact_old["any_order"])
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - elbo_delta) < 4 * se + 1e-3  # unbiased for the ELBO difference ...
    assert abs(float(est.mean()) - log_p_delta) > 8 * se  # ... which is not the log-likelihood difference


def test_d1_without_prompt_masking_is_the_all_masked_table_row():
    old = sharp_model(6)
    new = perturbed(old, 7)
    batch = single_completion(PROMPT, torch.tensor([1, 1, 0]), COLUMNS)
    raw, t = mask_draws(new, old, batch, "d1", "arlike", draws=5, num_iterations=1, min_mask_rate=0.6,
                        p_mask_prompt=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(t == 1)
    # the MaskGRPO estimator on a fixed mask of every completion position, t = 1
    full = torch.zeros_like(batch.sequences, dtype=torch.bool)
    full[:, batch.positions] = True
    fixed = log_ratio_estimate(new, old, batch, full)
    # and the revealed-set-{} row of the exact likelihood's table: sum_i log pi_new(o_i | all masked) - old
    table_row = (subset_logps(new, batch)[:, 0] - subset_logps(old, batch)[:, 0]).sum(-1)
    assert float((raw.flatten() - fixed).abs().max()) < 1e-6
    assert float((fixed - table_row).abs().max()) < 1e-5
    assert abs(float(fixed)) > 1e-3


def test_estimator_table_runs_and_vanishes_for_identical_policies(tmp_path):
    old, new = make_policies(seed=0, pretrain_steps=3, shift_steps=2)
    g = torch.Generator().manual_seed(0)
    batch = toy_completions(old, 2, 2, g)
    rows, markdown = estimator_table(new, old, batch, generator=g, draws=4, num_iterations=2)
    assert len(rows) == 3 + len(ESTIMATORS) and markdown.count("\n") == len(rows) + 1
    for row in rows:
        for key in ("mean", "bias", "std_completions", "std_masks", "rmse", "corr_avg", "sign_agree"):
            assert math.isfinite(row[key]), (row["name"], key)
    assert rows[0]["bias"] == 0 and rows[0]["corr_avg"] == pytest.approx(1.0)
    assert [p["ratio"] for p in rows[3]["per_ratio"]] == [0.8, 0.999]
    plot_estimators(rows, tmp_path / "estimators.png")
    assert (tmp_path / "estimators.png").stat().st_size > 0
    # pi_theta == pi_old: every estimate and the exact log-ratio are exactly zero (rho == 1)
    same, _ = estimator_table(old, old, batch, generator=g, draws=2, num_iterations=2)
    for row in same:
        assert row["mean"] == 0 and row["std_masks"] == 0, row["name"]
