"""The length study (jaxlin.length_study) on tiny models in float64: each length equals a
separate linearization of that prefix, the stochastic influence is unbiased and within its
stated error, an interrupted study resumes with only the missing lengths, bad input is one
line with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxlin import length_study
from jaxlin import model as model_fns
from jaxlin.cli import main
from jaxlin.jacobian import Products, linearize
from jaxlin.length_study import (
    StudySettings,
    binned_loglog_fit,
    entropy_rank_bounds,
    fingerprint,
    group_masks,
    influence_decay,
    length_path,
    length_record,
    measure_prefix,
    run_study,
    sampled_token_norms,
    stored_length,
    study_document,
    token_groups,
)
from jaxlin.loading import load_model
from jaxlin.operator import certify, contributions, group_contributions, group_sums, rows
from jaxlin.run_config import parse_run_config
from jaxlin.spectral import top_k
from jaxlin.tokens import tokenize

DOCUMENT = "The quick brown fox jumps over the lazy dog; then it naps."  # 58 characters + BOS
VARIANT = "llama_gqa_untied"


def study_config(tmp_path: Path, model_dir: Path, name: str = "study", **section) -> dict:
    return {
        "model": {"source": "hf", "path": str(model_dir), "dtype": "float64", "cache": False},
        "analysis": {"top_k": 3},
        "length_study": {"document": DOCUMENT, "lengths": [7, 12, 20], **section},
        "output_dir": str(tmp_path / name),
    }


def records(out: Path, lengths: list[int]) -> list[dict]:
    return [json.loads(length_path(out, p).read_text()) for p in lengths]


def numbers(record: dict) -> dict:
    """A record without what differs between two computations of the same numbers."""
    return {
        k: v
        for k, v in record.items()
        if k not in ("seconds", "compile_seconds", "compute_seconds", "memory")
    }


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model("hf", str(tiny_model_dir(VARIANT)), "float64", use_cache=False)


def prefix_jacobian(loaded, length: int):
    config, params = loaded.model.config, loaded.model.params
    ids = tokenize(loaded.tokenizer, DOCUMENT, None)
    inputs = model_fns.embed(config, params, jnp.asarray(ids[:length]))
    return linearize(params, inputs, config), inputs


@pytest.mark.parametrize("influence", ["exact", "stochastic"])
def test_each_length_equals_a_separate_linearization(tmp_path, tiny_model_dir, loaded, influence):
    config = parse_run_config(study_config(tmp_path, tiny_model_dir(VARIANT), influence=influence))
    summary, out = run_study(config, verbose=False)
    assert summary["lengths"] == [7, 12, 20]
    model = loaded.model
    for record in records(out, [7, 12, 20]):
        p = record["length"]
        jacobian, inputs = prefix_jacobian(loaded, p)
        dense = np.asarray(rows(jacobian), np.float64)  # (d, p, d): J itself, exactly
        c = np.asarray(contributions(jacobian), np.float64)
        certificate = certify(
            jacobian.output,
            jnp.asarray(c),
            lambda h: model_fns.logits(model.config, model.params, h),
            jacobian.bias,
        )
        assert abs(record["certificate"]["relative_error"] - certificate.relative_error) <= 1e-10
        assert record["certificate"]["relative_error"] < 1e-10
        assert record["certificate"]["predicted_token_id"] == certificate.predicted_token_id
        triplets = top_k(jacobian, 3)
        np.testing.assert_allclose(record["spectrum"]["singular_values"], triplets.S, rtol=1e-10, atol=0)
        s_exact = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=False)
        np.testing.assert_allclose(record["spectrum"]["singular_values"], s_exact[:3], rtol=1e-10)
        influence_sq = np.sum(dense**2, axis=(0, 2))
        contribution_sq = np.sum(c**2, axis=1)
        frobenius_sq = float(np.sum(dense**2))
        if influence == "exact":
            np.testing.assert_allclose(record["influence"]["jacobian_sq"], influence_sq, rtol=1e-10)
            np.testing.assert_allclose(record["influence"]["contribution_sq"], contribution_sq, rtol=1e-10)
            assert record["frobenius_sq"] == pytest.approx(frobenius_sq, rel=1e-10)
            assert record["stable_rank"] == pytest.approx(frobenius_sq / s_exact[0] ** 2, rel=1e-10)
            # all d singular values known exactly: the entropy rank of the whole spectrum
            shares = s_exact**2 / frobenius_sq
            exact_entropy = math.exp(-np.sum(shares * np.log(shares)))
            assert record["entropy_rank"]["lower"] == pytest.approx(exact_entropy, rel=1e-10)
            assert record["entropy_rank"]["upper"] == pytest.approx(exact_entropy, rel=1e-10)
            assert record["sink"]["influence_share"] == pytest.approx(
                influence_sq[0] / frobenius_sq, rel=1e-10
            )
        else:
            assert record["influence"]["method"] == "stochastic"
            estimate, error = (np.asarray(record["influence"][k]) for k in ("jacobian_sq", "jacobian_sq_se"))
            lower, upper = record["entropy_rank"]["lower"], record["entropy_rank"]["upper"]
            shares = s_exact**2 / frobenius_sq
            assert lower < upper and lower <= math.exp(-np.sum(shares * np.log(shares))) * 1.05
            assert np.all(error > 0) and np.all(np.abs(estimate - influence_sq) <= 5 * error)
    assert (out / "summary.json").is_file() and (out / "report.html").is_file()
    for name in (
        "spectrum_vs_length",
        "effective_rank_vs_length",
        "influence_vs_distance",
        "sink_share_vs_length",
    ):
        assert (out / f"{name}.png").stat().st_size > 0
    assert summary["fits"]["compute_seconds_vs_length"] is not None
    assert summary["fits"]["compute_seconds_per_product_vs_length"] is not None


def test_stochastic_influence_is_unbiased_and_within_its_error(loaded):
    jacobian, inputs = prefix_jacobian(loaded, 16)
    dense = np.asarray(rows(jacobian), np.float64)
    exact = {
        "influence": np.sum(dense**2, axis=(0, 2)),
        "contribution": np.sum(np.asarray(contributions(jacobian), np.float64) ** 2, axis=1),
    }
    seeds = 40
    runs = [sampled_token_norms(jacobian, jax.random.key(seed), 32, 16) for seed in range(seeds)]
    for name, value, error in (
        ("influence", "influence_sq", "influence_sq_se"),
        ("contribution", "contribution_sq", "contribution_sq_se"),
    ):
        estimates = np.stack([getattr(r, value) for r in runs])
        errors = np.stack([getattr(r, error) for r in runs])
        # Within the error bars: one run everywhere within 5 standard errors; over all runs
        # and tokens, about the normal coverage (the mean of 32 skewed terms is not quite normal).
        z = np.abs(estimates - exact[name]) / errors
        assert np.all(z[0] < 5), name
        assert np.mean(z < 2) > 0.85 and np.mean(z < 3) > 0.97, (name, np.mean(z < 2), np.mean(z < 3))
        # Unbiased: the mean over seeds meets the exact value within the pooled error.
        pooled = np.sqrt(np.sum(errors**2, axis=0)) / seeds
        assert np.all(np.abs(estimates.mean(axis=0) - exact[name]) < 4 * pooled), name
        assert np.all(pooled < 0.05 * exact[name] + 1e-300), name  # the check has teeth
    totals = np.asarray([r.frobenius_sq for r in runs])
    assert (
        abs(totals.mean() - dense.__pow__(2).sum())
        < 4 * np.sqrt(np.sum([r.frobenius_sq_se**2 for r in runs])) / seeds
    )


def test_interrupted_study_resumes_only_the_missing_lengths(tmp_path, tiny_model_dir, monkeypatch):
    data = study_config(tmp_path, tiny_model_dir(VARIANT))
    config = parse_run_config(data)
    original = length_study.measure_prefix
    computed: list[int] = []

    class Killed(Exception):
        pass

    def killed_after_one(config, params, inputs, length, settings):
        if computed:
            raise Killed
        computed.append(length)
        return original(config, params, inputs, length, settings)

    monkeypatch.setattr(length_study, "measure_prefix", killed_after_one)
    with pytest.raises(Killed):
        run_study(config, verbose=False)
    out = tmp_path / "study"
    assert length_path(out, 7).is_file() and not length_path(out, 12).exists()
    assert not (out / "summary.json").exists()

    def counting(config, params, inputs, length, settings):
        computed.append(length)
        return original(config, params, inputs, length, settings)

    computed.clear()
    monkeypatch.setattr(length_study, "measure_prefix", counting)
    summary, _ = run_study(config, verbose=False)
    assert computed == [12, 20] and summary["lengths_reused"] == [7]
    # the same numbers as a study that was never interrupted
    fresh = parse_run_config({**data, "output_dir": str(tmp_path / "fresh")})
    run_study(fresh, verbose=False)
    for resumed, whole in zip(
        records(out, [7, 12, 20]), records(tmp_path / "fresh", [7, 12, 20]), strict=True
    ):
        assert numbers(resumed) == numbers(whole)
    # a stored length is reused under settings that compute it the same way, and only then
    document = study_document(config.length_study)
    settings = StudySettings.from_config(config, "study")
    stored = length_path(out, 7)
    for changed, reusable in (
        ({"max_exact_tokens": 7}, True),  # length 7 is still exact
        ({"influence_samples": 9}, True),  # samples do not enter an exact length
        ({"max_exact_tokens": 6}, False),  # now stochastic
        ({"sink_tokens": 2}, False),
        ({"seed": 1}, False),
    ):
        other = fingerprint(config, document, dataclasses.replace(settings, **changed), 7)
        assert (stored_length(stored, other, 7) is not None) == reusable, changed
    other_model = parse_run_config({**data, "model": {**data["model"], "dtype": "float32"}})
    assert stored_length(stored, fingerprint(other_model, document, settings, 7), 7) is None


def test_cli_run_and_bench(tmp_path, tiny_model_dir, capsys):
    data = study_config(tmp_path, tiny_model_dir(VARIANT), lengths=[5, 9, 500])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipped 500: the document has only 59 tokens" in out and "time ∝ length^" in out
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["kind"] == "length_study" and summary["lengths"] == [5, 9]
    # bench: an ordinary run config (its text is not the document), lengths from the command line
    run_config = {k: v for k, v in data.items() if k != "length_study"} | {"text": "Hello"}
    path.write_text(yaml.safe_dump(run_config))
    assert main(["bench", str(path), "--lengths", "9", "6", "--quiet"]) == 0
    bench = tmp_path / "study-bench"
    summary = json.loads((bench / "summary.json").read_text())
    assert summary["kind"] == "bench" and summary["lengths"] == [6, 9]
    assert summary["settings"]["influence"] == "exact"  # the run's per_token method (exact by default)
    assert summary["document"]["source"] == "builtin: alice"
    assert (bench / "time_memory_vs_length.png").is_file() and not (bench / "spectrum_vs_length.png").exists()


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"lengths": [8, 8]}, "length_study.lengths: lengths has a length given twice"),
        ({"lengths": [1]}, "length_study.lengths.0: Input should be greater than or equal to 2"),
        ({"influence": "sometimes"}, "length_study.influence: Input should be"),
        ({"influence_samples": 1}, "length_study.influence_samples"),
        ({"lenghts": [8]}, "length_study.lenghts: unknown key"),
        ({"document": "a", "builtin": "alice"}, "length_study: give at most one of document, document_file"),
        (
            {"document": None, "document_file": "/nonexistent/doc.txt"},
            "length_study.document_file: /nonexistent",
        ),
    ],
)
def test_bad_study_config_is_one_line(tmp_path, tiny_model_dir, capsys, section, fragment):
    data = study_config(tmp_path, tiny_model_dir(VARIANT))
    data["length_study"] = {**data["length_study"], **section}
    if section.get("document", "") is None:
        del data["length_study"]["document"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxlin: error: ") and fragment in err, err
    assert not (tmp_path / "study").exists()


def test_text_beside_a_study_and_bad_bench_lengths_are_refused(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**study_config(tmp_path, tiny_model_dir(VARIANT)), "text": "Hi"}))
    assert main(["run", str(path), "--quiet"]) == 2
    assert "text is given but a length study reads its document from length_study" in capsys.readouterr().err
    assert main(["bench", str(path), "--lengths", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lengths: every length must be at least 2" in err
    assert not (tmp_path / "study").exists() and not (tmp_path / "study-bench").exists()


def test_entropy_rank_bounds_hold_the_true_value():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sigma = np.sort(rng.gamma(0.7, size=30))[::-1]
        shares = sigma**2 / np.sum(sigma**2)
        true = math.exp(-np.sum(shares * np.log(shares)))
        lower, upper = entropy_rank_bounds(sigma[:5], float(np.sum(sigma**2)), 30)
        assert lower <= true <= upper and lower < upper
        assert entropy_rank_bounds(sigma, float(np.sum(sigma**2)), 30) == pytest.approx(
            (true, true), rel=1e-12
        )


def test_decay_fit_recovers_a_power_law():
    distance = np.arange(40, 0, -1, dtype=np.float64)  # tokens 0..39 ahead of the target 40
    influence = np.concatenate([[50.0], 3.0 * distance[1:] ** -0.8, [7.0]])  # sink, power law, target
    fit = influence_decay(influence, sink_tokens=1)
    assert fit["exponent"] == pytest.approx(0.8, rel=1e-10) and fit["r2"] == pytest.approx(1.0)
    binned = fit["binned"]
    assert binned["exponent"] == pytest.approx(0.8, rel=1e-10) and binned["r2"] == pytest.approx(1.0)
    assert binned["points"] == 6  # distances 1 … 39: bins [1,2) [2,4) … [32,64)


def test_binned_decay_weighs_every_scale_the_same():
    """Near tokens follow δ^-1, far ones are flat: the pointwise fit sees mostly far tokens,
    the binned one the same number of points per factor of 2."""
    distance = np.arange(1, 1025, dtype=np.float64)
    influence = np.where(distance <= 32, distance**-1.0, 1 / 32)
    points = influence_decay(np.concatenate([[1.0], influence[::-1], [1.0]]), sink_tokens=1)
    binned = binned_loglog_fit(distance, influence)
    assert binned["points"] == 11
    # Bins [1,2) … [16,32) follow the law (5 of 11); the pointwise fit has 32 of 1024 there.
    assert points["binned"]["slope"] == pytest.approx(binned["slope"], rel=1e-12)
    assert abs(binned["slope"]) > 2 * abs(points["slope"])


def test_settings_of_a_bench_follow_the_run_config():
    config = parse_run_config(
        {"text": "x", "analysis": {"per_token": {"method": "projected"}, "frobenius_samples": 9}}
    )
    settings = StudySettings.from_config(config, "bench")
    assert settings.influence == "stochastic" and settings.influence_samples == 9
    assert not settings.exact_influence(8)


def test_a_length_stored_before_the_binned_fit_resumes_with_it(tmp_path, tiny_model_dir):
    """A stored length keeps the decay fit of the code that wrote it; the summary and the
    figures recompute the fits from its stored per-token norms, so a resume renders today's."""
    config = parse_run_config(study_config(tmp_path, tiny_model_dir(VARIANT)))
    first, out = run_study(config, verbose=False)
    for length in first["lengths"]:  # as an earlier version wrote them
        path = length_path(out, length)
        record = json.loads(path.read_text(encoding="utf-8"))
        del record["decay"]["binned"]
        path.write_text(json.dumps(record), encoding="utf-8")
    (out / "influence_vs_distance.png").unlink()
    again, _ = run_study(config, verbose=False)
    assert again["lengths_reused"] == first["lengths"]
    assert [row["decay"] for row in again["rows"]] == [row["decay"] for row in first["rows"]]
    assert all(row["decay"]["binned"] is not None for row in again["rows"])
    assert (out / "influence_vs_distance.png").is_file()


@pytest.mark.parametrize(("length", "sink"), [(p, s) for p in range(1, 70) for s in (1, 2, 5)])
def test_token_groups_partition_the_tokens_in_factor_two_distance_bins(length, sink):
    groups = token_groups(length, sink)
    covered = np.zeros(length, np.int64)
    for group in groups:
        covered[group.first : group.last + 1] += 1
    assert np.all(covered == 1)  # every token in exactly one group
    assert np.array_equal(np.asarray(group_masks(groups, length, jnp.float64)).sum(axis=0), covered)
    first, *bins = groups
    assert first.kind == "sink" and (first.first, first.last) == (0, min(sink, length) - 1)
    assert all(g.kind == "distance" for g in bins)
    for k, group in enumerate(bins):  # δ = 0, 1, 2–3, 4–7, …; the farthest clipped at the sink
        nearest, farthest = group.distances
        assert nearest == (0 if k == 0 else 2 ** (k - 1))
        full = 0 if k == 0 else 2**k - 1
        assert farthest == (full if k < len(bins) - 1 else min(full, length - 1 - sink))
    farthest = length - 1 - sink  # the farthest distance past the sink
    assert len(bins) == (0 if farthest < 0 else 1 if farthest == 0 else math.floor(math.log2(farthest)) + 2)


def test_token_groups_of_twenty_tokens():
    table = [(g.kind, g.first, g.last, g.distances) for g in token_groups(20, 1)]
    assert table == [
        ("sink", 0, 0, (19, 19)),
        ("distance", 19, 19, (0, 0)),
        ("distance", 18, 18, (1, 1)),
        ("distance", 16, 17, (2, 3)),
        ("distance", 12, 15, (4, 7)),
        ("distance", 4, 11, (8, 15)),
        ("distance", 1, 3, (16, 18)),
    ]


@pytest.mark.parametrize(("variant", "sink"), [(VARIANT, 1), ("llama_biases", 3)])
def test_group_contributions_are_sums_of_the_exact_token_contributions(tiny_model_dir, variant, sink):
    """c_g = J·X_g, one product per group, equals Σ_{t ∈ g} c_t of the exact per-token
    contributions, and certifies y as they do (with c_bias, nonzero for a model with biases)."""
    other = load_model("hf", str(tiny_model_dir(variant)), "float64", use_cache=False)
    jacobian, _ = prefix_jacobian(other, 20)
    exact = np.asarray(contributions(jacobian), np.float64)  # (20, d), one product per token
    groups = token_groups(20, sink)
    masks = group_masks(groups, 20, jnp.float64)
    products = Products()
    grouped = np.asarray(group_contributions(jacobian, masks, 3, products), np.float64)  # chunks of 3
    assert products.matvecs == len(groups) and products.rmatvecs == 0
    for group, value in zip(groups, grouped, strict=True):
        expected = exact[group.first : group.last + 1].sum(axis=0)
        assert np.linalg.norm(value - expected) <= 1e-10 * np.linalg.norm(expected), group
    summed = np.asarray(group_sums(jnp.asarray(exact), masks))
    np.testing.assert_allclose(summed, grouped, rtol=1e-10, atol=1e-10 * np.abs(grouped).max())

    def logits_of(hidden):
        return model_fns.logits(other.model.config, other.model.params, hidden)

    if variant == "llama_biases":
        assert float(jnp.linalg.norm(jacobian.bias)) > 1e-3 * float(jnp.linalg.norm(jacobian.output))
    by_token = certify(jacobian.output, jnp.asarray(exact), logits_of, jacobian.bias)
    by_group = certify(jacobian.output, jnp.asarray(grouped), logits_of, jacobian.bias)
    assert by_token.relative_error < 1e-10 and by_group.relative_error < 1e-10
    assert abs(by_token.relative_error - by_group.relative_error) <= 1e-10
    assert by_group.argmax_matches and by_group.predicted_token_id == by_token.predicted_token_id


def test_a_stochastic_length_certifies_from_its_groups(tmp_path, tiny_model_dir, loaded, monkeypatch):
    """Past max_exact_tokens the certificate is Σ_g c_g + c_bias against y: one product per
    group on top of the sampled influence and Lanczos, the same group table as the exact
    path, and an error in one group shows in the certificate (J·X in one product would not)."""
    config = parse_run_config(study_config(tmp_path, tiny_model_dir(VARIANT)))
    exact_settings = dataclasses.replace(StudySettings.from_config(config, "study"), influence="exact")
    settings = dataclasses.replace(exact_settings, influence="stochastic", influence_samples=8)
    model, texts = loaded.model, ["x"] * 20
    _, inputs = prefix_jacobian(loaded, 20)
    exact = length_record(
        measure_prefix(model.config, model.params, inputs, 20, exact_settings),
        texts,
        exact_settings,
        model.config.hidden_size,
    )
    sampled = length_record(
        measure_prefix(model.config, model.params, inputs, 20, settings),
        texts,
        settings,
        model.config.hidden_size,
    )
    groups = token_groups(20, settings.sink_tokens)
    assert sampled["certificate"]["from"] == f"group contributions ({len(groups)} groups)"
    assert exact["certificate"]["from"] == "per-token contributions"
    assert sampled["certificate"]["relative_error"] < 1e-10
    assert abs(sampled["certificate"]["relative_error"] - exact["certificate"]["relative_error"]) <= 1e-10
    for by_product, by_sum in zip(sampled["groups"], exact["groups"], strict=True):
        assert {**by_product, "norm": 0} == {**by_sum, "norm": 0}
        assert by_product["norm"] == pytest.approx(by_sum["norm"], rel=1e-10)
    # The products: the sampled influence and Lanczos (counted on their own), then one per group.
    jacobian, _ = prefix_jacobian(loaded, 20)
    lanczos = Products()
    top_k(
        jacobian,
        settings.top_k,
        settings.tolerance,
        settings.krylov_depth,
        settings.seed,
        min(settings.chunk, settings.top_k),
        products=lanczos,
    )
    bias = int(model.config.has_biases)
    assert sampled["products"] == {
        "linearizations": 1,
        "matvecs": bias + lanczos.matvecs + len(groups),
        "rmatvecs": settings.influence_samples + lanczos.rmatvecs,
    }
    # An error of 1e-3·‖y‖ in one group's c_g is what the certificate then reports.
    y_norm = float(jnp.linalg.norm(jacobian.output))

    def one_group_off(jacobian, masks, chunk, products):
        grouped = group_contributions(jacobian, masks, chunk, products)
        return grouped.at[-1, 0].add(1e-3 * y_norm)

    monkeypatch.setattr(length_study, "group_contributions", one_group_off)
    off = measure_prefix(model.config, model.params, inputs, 20, settings)
    assert off.certificate.relative_error == pytest.approx(1e-3, rel=1e-6)


def test_a_length_stored_before_the_group_certificate_is_recomputed(tmp_path, tiny_model_dir, capsys):
    """A record of version 2 (a stochastic length certified by J·X in one product, no group
    table) is computed again, so every row of a resumed study has its groups."""
    config = parse_run_config(study_config(tmp_path, tiny_model_dir(VARIANT), max_exact_tokens=10))
    first, out = run_study(config, verbose=False)
    assert [r["certificate"]["from"] for r in first["rows"]] == ["per-token contributions"] + [
        f"group contributions ({len(token_groups(p, 1))} groups)" for p in (12, 20)
    ]
    for length in first["lengths"]:  # as version 2 wrote them
        path = length_path(out, length)
        record = json.loads(path.read_text(encoding="utf-8"))
        del record["groups"]
        record["fingerprint"]["version"] = 2
        path.write_text(json.dumps(record), encoding="utf-8")
    again, _ = run_study(config, verbose=False)
    assert again["lengths_reused"] == []
    assert [row["groups"] for row in again["rows"]] == [row["groups"] for row in first["rows"]]
    third, _ = run_study(config, verbose=False)  # and version 3 records are reused as they are
    assert third["lengths_reused"] == first["lengths"]
    length_study.print_summary(third, out)
    printed = capsys.readouterr().out
    assert "‖c_g‖ per group" in printed and "     20 sink: " in printed
    assert (out / "groups_vs_distance.png").stat().st_size > 0
    assert "Group contributions" in (out / "report.html").read_text(encoding="utf-8")
