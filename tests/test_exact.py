"""toy/exact.py: the exact likelihood of the random-order sampler (a DP over revealed sets) against
plain enumeration, and the estimator comparison built on it."""

import itertools
import math

import pytest
import torch

from maskgrpo import MaskedDiffusionLM, ModelConfig, generate_image, generate_text
from toy.common import ConfigError, parse_config
from toy.exact import (
    ESTIMATORS,
    SEMI_AR_ESTIMATORS,
    Config,
    all_completions,
    commit_decision_table,
    completion_distribution,
    estimator_masks,
    estimator_table,
    exact_logprob,
    exact_logprobs,
    image_dp,
    law_distance,
    log_ratio_estimate,
    make_policies,
    make_semi_ar_policies,
    mask_draws,
    plot_estimators,
    plot_semi_ar,
    sample_random_order,
    semi_ar_completions,
    semi_ar_table,
    single_completion,
    subset_logps,
    text_dp,
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
    plot_estimators(rows).savefig(tmp_path / "estimators.png")
    assert (tmp_path / "estimators.png").stat().st_size > 0
    # pi_theta == pi_old: every estimate and the exact log-ratio are exactly zero (rho == 1)
    same, _ = estimator_table(old, old, batch, generator=g, draws=2, num_iterations=2)
    for row in same:
        assert row["mean"] == 0 and row["std_masks"] == 0, row["name"]


# -----------------------------------------------------------------------------
# Exact distributions of the real samplers (text_dp, image_dp) against the samplers themselves

DRAWS = 20000
# one-sided chi-square test at level 1e-6: the Wilson-Hilferty z of the statistic must stay below the
# normal quantile z_{1 - 1e-6} = 4.753 (a real mismatch grows the statistic ~ linearly in the draws)
Z_CRITICAL = 4.753


def chi_square_z(samples, support, probs):
    """Pearson's chi-square of `samples` (n, L) against the exact law (support (C, L), probs (C,)), cells with an
    expected count < 5 pooled into one; returned as the Wilson-Hilferty normal score of chi2(df). A sample
    outside the support raises (KeyError): the exact law gives it probability 0."""
    index = {tuple(row): i for i, row in enumerate(support.tolist())}
    counts = torch.zeros(len(support), dtype=torch.float64)
    for row, n in zip(*torch.unique(samples, dim=0, return_counts=True), strict=True):
        counts[index[tuple(row.tolist())]] += n
    expected = probs.detach() * len(samples)
    big = expected >= 5
    observed, expected = counts[big], expected[big]
    if (~big).any():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expected = torch.cat([expected, (probs.detach() * len(samples))[~big].sum()[None]])
    stat, df = float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def two_layer_model(seed):
    """sharp_model with two layers: a KV cache is stale only when keys depend on other tokens (layer >= 2)."""
    cfg = ModelConfig.tiny(VOCAB, MASK, EOS, d_model=16, n_layers=2, n_heads=2, mlp_hidden_size=32, max_sequence_length=16)
    g = torch.Generator().manual_seed(seed)
    model = MaskedDiffusionLM(cfg, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5, generator=g).requires_grad_(False)
    return model.eval()


TEXT_SAMPLERS = [
    dict(block_length=2, steps=4, cache="none", threshold=None),  # semi-AR, one commit per step
    dict(block_length=4, steps=2, cache="none", threshold=None),  # two commits per step: the confidence ranking
    dict(block_length=2, steps=4, cache="prefix", threshold=None),
    dict(block_length=2, steps=4, cache="dual", threshold=0.3),
    dict(block_length=4, steps=4, cache="none", threshold=0.3),  # threshold: 1..4 commits per step, early exit
]


@pytest.mark.parametrize("sampler", TEXT_SAMPLERS, ids=lambda s: "-".join(map(str, s.values())))
def test_text_dp_is_the_distribution_of_generate_text(sampler):
    model = two_layer_model(10)
    prompt = PROMPT[None]
    _, support, probs = text_dp(model, prompt, gen_length=4, temperature=0.8, mask_id=MASK, **sampler)
    assert len(support) == 4 ** 4 and len(torch.unique(support, dim=0)) == len(support)  # EOS is a candidate too
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    samples = generate_text(model, prompt.expand(DRAWS, -1), gen_length=4, temperature=0.8, mask_id=MASK,
                            generator=torch.Generator().manual_seed(0), **sampler)[:, 2:]
    assert chi_square_z(samples, support, probs) < Z_CRITICAL


def test_the_chi_square_test_rejects_another_sampler():
    """The test above has power: the same draws fail against the law of a different schedule."""
    model = two_layer_model(10)
    prompt = PROMPT[None]
    _, support, probs = text_dp(model, prompt, gen_length=4, block_length=4, steps=2, temperature=0.8, mask_id=MASK)
    samples = generate_text(model, prompt.expand(DRAWS, -1), gen_length=4, block_length=2, steps=4, temperature=0.8,
                            mask_id=MASK, generator=torch.Generator().manual_seed(0))[:, 2:]
    assert chi_square_z(samples, support, probs) > 3 * Z_CRITICAL


@pytest.mark.parametrize("mode", ["emerge", "maskgit"])
def test_image_dp_is_the_distribution_of_generate_image(mode):
    model = two_layer_model(11)
    canvas = torch.tensor([[0, 1, MASK, MASK, MASK, MASK]])
    where = slice(2, 6)
    kw = dict(positions=where, columns=COLUMNS, steps=3, mask_id=MASK, mode=mode, temperature=0.9)
    _, support, probs = image_dp(model, canvas, **kw)
    assert len(support) == 3 ** 4 and float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    samples = generate_image(model, canvas.expand(DRAWS, -1).clone(), generator=torch.Generator().manual_seed(0),
                             **kw)[:, where]
    assert chi_square_z(samples, support, probs) < Z_CRITICAL


def test_targeted_dp_equals_the_full_distribution_and_its_gradient():
    model = two_layer_model(12)
    sampler = dict(gen_length=4, block_length=2, steps=4, temperature=0.8, mask_id=MASK, cache="dual", threshold=0.3)
    _, support, probs = text_dp(model, PROMPT[None], **sampler)
    pick = torch.tensor([0, 17, 100, 255])
    rows, comps, target_probs = text_dp(model, PROMPT[None].expand(4, -1), targets=support[pick], **sampler)
    assert rows.tolist() == [0, 1, 2, 3] and torch.equal(comps, support[pick])
    assert torch.allclose(target_probs, probs[pick], rtol=1e-9, atol=0)
    # the gradient of log P(o) in the weights (autograd through the DP) against central differences
    weight = model.model.transformer.ff_out.weight
    weight.requires_grad_(True)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    log_p = text_dp(model, PROMPT[None], targets=support[pick[1:2]], **sampler)[2].log().sum()
    (grad,) = torch.autograd.grad(log_p, weight)
    weight.requires_grad_(False)
    eps, values = 1e-3, []
    for sign in (1, -1):
        with torch.no_grad():
            weight.add_(sign * eps * direction)
            values.append(float(text_dp(model, PROMPT[None], targets=support[pick[1:2]], **sampler)[2].log()))
            weight.sub_(sign * eps * direction)
    assert float((grad * direction).sum()) == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-2)
    assert abs(float((grad * direction).sum())) > 1e-2


def test_law_distance_sees_the_stale_cache():
    """With two layers a cached rollout has its own law (keys/values of later commits are stale); its distance
    to the exact sampler's law is a proper distance: 0 to itself, > 0 to the cached one."""
    model = two_layer_model(13)
    sampler = dict(gen_length=4, block_length=2, steps=4, temperature=0.8, mask_id=MASK)
    _, support, exact = text_dp(model, PROMPT[None], **sampler)
    _, support_dual, dual = text_dp(model, PROMPT[None], cache="dual", **sampler)
    assert law_distance(support, exact, support, exact) == dict(kl=0.0, tv=0.0)
    far = law_distance(support, exact, support_dual, dual)
    assert 0.005 < far["tv"] < 1 and far["kl"] > 0
    reversed_support = law_distance(support.flip(0), exact.flip(0), support_dual, dual)
    assert reversed_support["tv"] == pytest.approx(far["tv"]) and reversed_support["kl"] == pytest.approx(far["kl"])


# -----------------------------------------------------------------------------
# The semi-AR study


def test_coupled_masks_hide_every_token_exactly_once_and_espo_is_the_elbo_over_length():
    old, _ = make_semi_ar_policies(seed=0, pretrain_steps=1, rl_steps=0)
    batch = semi_ar_completions(old, 3, 2, torch.Generator().manual_seed(0))
    by_kind = {e.kind: e for e in SEMI_AR_ESTIMATORS}
    pairs, t = estimator_masks(batch, by_kind["coupled"], 0, num_iterations=1, min_mask_rate=0.6, p_mask_prompt=0.15,
                               generator=torch.Generator().manual_seed(1))
    (m1, w1), (m2, w2) = pairs
    assert torch.equal(m1[:, batch.positions] ^ m2[:, batch.positions], batch.scored)
    assert not (m1[:, :batch.positions.start] | m2[:, :batch.positions.start]).any()
    espo, t_espo = estimator_masks(batch, by_kind["espo"], 0, num_iterations=1, min_mask_rate=0.6, p_mask_prompt=0.15,
                                   generator=torch.Generator().manual_seed(1))
    elbo, _ = estimator_masks(batch, by_kind["elbo"], 0, num_iterations=1, min_mask_rate=0.6, p_mask_prompt=0.15,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(espo[0][0], elbo[0][0])  # the same draw ...
    assert torch.allclose(espo[0][1] * batch.scored.sum(1), elbo[0][1])  # ... weighted 1/(t L) instead of 1/t
    assert torch.allclose(elbo[0][1], 1 / t_espo)


def test_semi_ar_table_runs_and_vanishes_for_identical_policies():
    old, new = make_semi_ar_policies(seed=0, pretrain_steps=3, rl_steps=1, prompts_per_step=2, group=2)
    g = torch.Generator().manual_seed(0)
    batch = semi_ar_completions(old, 2, 2, g)
    assert batch.trajectory is not None and sorted(batch.trajectory[0].tolist()) == list(range(1, 7))
    rows, markdown = semi_ar_table(new, old, batch, generator=g, draws=2, num_iterations=2, grad_completions=1,
                                   grad_draws=1)
    assert len(rows) == 5 + len(SEMI_AR_ESTIMATORS) and markdown.count("\n") == len(rows) + 1
    assert rows[0]["bias"] == 0 and rows[0]["cos_1mask"] == 1.0
    for row in rows[5:]:
        assert -1 <= row["cos_1mask"] <= 1 and math.isfinite(row["rmse"]), row["name"]
    assert plot_semi_ar(rows).axes
    # pi_theta == pi_old: the exact semi-AR log-ratio and every estimate are exactly zero
    same, _ = semi_ar_table(old, old, batch, generator=g, draws=2, num_iterations=2, grad_completions=0)
    for row in same:
        assert row["mean"] == 0 and row["std_masks"] == 0, row["name"]


def test_cli_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="semi_ar_gamma"):
        parse_config(Config, ["--semi_ar_gamma=1.5"])
    with pytest.raises(ConfigError, match="draws"):
        parse_config(Config, ["--draws=0"])
    assert parse_config(Config, ["--semi_ar_seeds=2"]).semi_ar_seeds == 2


def test_commit_decision_table_is_zero_without_a_policy_step():
    rows, markdown = commit_decision_table(0, (1e-4,), num_prompts=2, group=2, pretrain_steps=3, rl_steps=0)
    assert markdown.count("\n") == 2
    assert rows[0]["delta"] == rows[0]["smooth"] == rows[0]["jump"] == rows[0]["any_order"] == 0.0
