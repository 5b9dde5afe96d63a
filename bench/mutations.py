"""Mutation check: plant known bugs in a scratch copy of the library, one at a time, and see whether the tests fail.

Each mutant is one exact text edit of one library file (the bug an independent review planted, or one an oracle
test was written to catch) and the tests that should catch it. For every mutant the script copies ``src/`` and
``tests/`` (and ``examples/``) into a scratch folder, applies the edit there (the working tree is never touched), runs the named
tests against the scratch copy and counts the mutant as *killed* when they fail. The unmutated tests are run
once first: a mutant can only be killed by tests that pass without it.

    python bench/mutations.py              # every mutant; last line: "killed K / N"
    python bench/mutations.py --list       # the mutants and the tests that should catch them
    python bench/mutations.py --only cca_no_whitening ot_column_sums

An edit that no longer applies (its text is gone from the file, or appears twice) is an error, not a pass: the
mutant must be updated with the code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/mergescope
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids (files or file::test)
    why: str  # the bug in words


_ALIGN = "tests/test_oracle_alignment.py"
_COMPARE = "tests/test_oracle_compare.py"
_MAPS = "tests/test_oracle_maps.py"
_REPAIR = "tests/test_oracle_repair.py"
_REGRESSION = "tests/test_oracle_regression.py"
_REGISTRY = "tests/test_method_registry.py"
_FRONT = "tests/test_front_door.py"
_CLI = "tests/test_cli_vocabulary.py"
_RUNS = "tests/test_run_folders.py"
_DIST = "tests/test_distributed.py"
_AGG = "tests/test_aggregation.py"
MUTANTS: tuple[Mutant, ...] = (
    # -- weight matching, MergeMany, ZipIt! (Git Re-Basin Algorithms 1 and 3; Stoica et al. 2024)
    Mutant("wm_fixed_order_one_sweep", "align/weight_matching.py",
           "for gi in rng.permutation(len(names)):", "for gi in (range(len(names)) if _ == 0 else ()):",
           (_ALIGN,), "weight matching in a fixed group order, one sweep"),
    Mutant("mergemany_to_model_0", "align/merge_many_matching.py",
           "target = {k: sum(current[j][k] for j in range(n) if j != i) / (n - 1) for k in keys}",
           "target = {k: current[0][k] for k in keys}",
           (f"{_ALIGN}::test_merge_many_is_algorithm_3",), "MergeMany aligns every model to model 0"),
    Mutant("mergemany_one_round", "align/merge_many_matching.py", "if decrease <= 1e-12:", "if True:",
           (f"{_ALIGN}::test_merge_many_is_algorithm_3",), "MergeMany stops after one round"),
    Mutant("zipit_max_update", "merge/zipit.py", "new = torch.minimum(sims[i], sims[j])",
           "new = torch.maximum(sims[i], sims[j])", (_ALIGN,), "ZipIt! similarity update with max instead of min"),
    Mutant("zipit_budget_32x", "merge/zipit.py", "budget = [int(((d - ca) // 2) * b + 1e-4)] * 2",
           "budget = [int(((d - ca) // 2) * b * 32 + 1e-4)] * 2", (_ALIGN,), "ZipIt! within-model budget 32x"),
    Mutant("zipit_a0_blocks_all", "merge/zipit.py", "new[(origin == origin[i]) | (origin == origin[j])] = neg",
           "new[:] = neg", (_ALIGN,), "ZipIt! a = 0 forbids every re-merge, not only the origin models'"),
    Mutant("zipit_b0_forbids_first", "merge/zipit.py", "    while int(active.sum()) > ca:",
           "    for o in (0, 1):\n        if budget[o] <= 0:\n            sims[(origin == o).unsqueeze(1) & "
           "(origin == o).unsqueeze(0)] = neg\n    while int(active.sum()) > ca:",
           (_ALIGN,), "ZipIt! b = 0 forbids the first within-model merge"),
    # -- REPAIR (Jordan et al. 2023) on residual nets, residual streams measured at the stage end
    Mutant("repair_resnet_bn_only", "merge/repair.py", 'if points == "reference" and spec.block_outputs:',
           "if False and spec.block_outputs:", (_REPAIR,),
           "REPAIR on a ResNet corrects BatchNorm outputs only (= RESET up to rounding)"),
    Mutant("stream_all_points", "perm/spec.py", "return group.observe[-1:]", "return list(group.observe)", (_REPAIR,),
           "residual streams matched on the average over every observation point, not the stage end"),
    Mutant("repair_target_std_a", "merge/repair.py",
           "t_std = sum(w * s.std for w, s in zip(t.weights, stats))", "t_std = stats[0].std", (_REPAIR,),
           "REPAIR's target std is σ_A, not the interpolation of the endpoints'"),
    # -- CCA merging (Horoi et al. 2024) and OT fusion (Singh & Jaggi 2020)
    Mutant("cca_no_whitening", "merge/cca.py",
           "    forward[la.unsqueeze(1), lb.unsqueeze(0)] = sa_half @ rot @ sb_ihalf\n"
           "    inverse[lb.unsqueeze(1), la.unsqueeze(0)] = sb_half @ rot.T @ sa_ihalf",
           "    forward[la.unsqueeze(1), lb.unsqueeze(0)] = rot\n    inverse[lb.unsqueeze(1), la.unsqueeze(0)] = rot.T",
           (_MAPS,), "CCA without whitening: T = U·Vᵀ (plain Procrustes)"),
    Mutant("cca_relative_ridge_default", "merge/cca.py",
           "def cca_maps(stats: Mapping[str, JointMoments], ridge: float = 0.1, relative: bool = False",
           "def cca_maps(stats: Mapping[str, JointMoments], ridge: float = 0.1, relative: bool = True",
           (_MAPS,), "CCA's ridge relative to the mean variance instead of the reference's 0.1·I"),
    Mutant("ot_column_sums", "merge/ot.py", "    forward = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)",
           "    forward = plan / plan.sum(0, keepdim=True).clamp_min(1e-300)",
           (_MAPS,), "OT's forward map normalised by column instead of row sums"),
    Mutant("ot_squared_euclidean", "merge/ot.py", '        return sq.sqrt() if cost == "euclidean" else sq',
           "        return sq", (_MAPS,), "OT on squared instead of plain Euclidean distances"),
    Mutant("ot_stream_writers_pooled", "align/covariance.py", "if any(t.group == group for t in spec.block_outputs):",
           "if False and any(t.group == group for t in spec.block_outputs):",
           (f"{_MAPS}::test_ot_transports_a_residual_streams_own_preactivation_on_a_trained_resnet",),
           "OT's residual-stream pre-activations pooled from the convs writing into it, not the stream's own sum"),
    Mutant("ot_stream_post_activation", "align/covariance.py", "[spec.activation_inputs.get(t.name, t) for t in",
           "[t for t in", (f"{_MAPS}::test_ot_transports_a_residual_streams_own_preactivation_on_a_trained_resnet",),
           "OT on a residual stream's post-activation instead of its pre-activation"),
    Mutant("ot_post_activations", "merge/methods.py", '"ot", family="map", needs={"stats:preactivation"}',
           '"ot", family="map", needs={"stats:observe"}', (_MAPS,),
           "OT on post-activation features instead of pre-activations"),
    # -- regression alignment (thesis 000 §3.2.4) and the regression merge
    Mutant("r2_in_sample", "align/regression.py", "r2=heldout_r2(heldout, fit, fitted)",
           "r2=heldout_r2(fitted, fit, fitted)", (_REGRESSION,), "R² measured on the images the map was fitted on"),
    Mutant("r2_no_intercept_term", "align/regression.py",
           "        sse = sse + stats.n * (stats.mean_a - weight @ stats.mean_b - intercept) ** 2", "        sse = sse",
           (_REGRESSION,), "held-out R² ignores the fit's error in the mean"),
    Mutant("dprime_5_per_class", "studies/probe.py", "return stratified_subset(dataset.targets, size, seed=seed)",
           "return stratified_subset(dataset.targets, 5 * len(np.unique(dataset.targets)), seed=seed)",
           (_REGRESSION,), "D′ back to 5 images per class whatever the class count"),
    Mutant("fit_5_per_class", "align/regression.py",
           "fit = stratified_subset(dataset.targets, min(fit_images, n - held), seed)",
           "fit = stratified_subset(dataset.targets, 5 * len(np.unique(dataset.targets)), seed)",
           (_REGRESSION,), "the fitting subset back to 5 images per class"),
    Mutant("sparsity_smallest_weights", "align/regression.py", "support = score.topk(m, dim=1).indices",
           "support = score.topk(m, dim=1, largest=False).indices", (_REGRESSION,),
           "the sparsity sweep keeps the m smallest weights"),
    Mutant("regression_merge_ols", "merge/regression_merge.py",
           "    lam = merge_ridge(stats) if ridge is None else ridge", "    lam = 0.0 if ridge is None else ridge",
           (_REGRESSION,), "the regression merge without its ridge (collapses on nets without BatchNorm)"),
    # -- CLIP-δ and the null of "similar" (thesis 000 §3.1.4; DESIGN "Similar")
    Mutant("clip_delta_distinct_default", "compare/clip_delta.py",
           '    if variant == "distinct_images" and ids_a is not None:', "    if ids_a is not None:",
           ("tests/test_compare.py", _COMPARE), "CLIP-δ drops same-image pairs from C(T_A,T_B) and the denominator"),
    Mutant("null_matched_partners", "compare/study.py",
           "    rows, cols = diag[:, None].expand_as(partners).reshape(-1), partners.reshape(-1)",
           "    rows, cols = diag[:, None].expand_as(partners).reshape(-1), diag[:, None].expand_as(partners).reshape(-1)",
           (_COMPARE,), "the null uses the matched partner instead of unmatched channels"),
    # -- the method registry (issue 10): its flags are checked against what the methods do
    Mutant("registry_naive_exact", "merge/methods.py", '"naive", family="aggregation", exact_for_permuted=False,',
           '"naive", family="aggregation", exact_for_permuted=True,', (_REGISTRY,),
           "the direct average flagged exact for permuted copies"),
    Mutant("registry_permuted_inverse", "merge/methods.py",
           "return [{}] + [permutation_maps(r.perms) for r in inputs.matches]",
           "return [{}] + [permutation_maps({g: p.argsort() for g, p in r.perms.items()}) for r in inputs.matches]",
           (_REGISTRY,), "the permuted base applies the inverse permutations"),
    Mutant("registry_zipit_ignores_weights", "merge/methods.py", "    uses_weights=True,", "    uses_weights=False,",
           (_REGISTRY,), "ZipIt!'s maps cached across weightings though they depend on them"),
    # -- the front door: checkpoints in any form (issue 10)
    Mutant("front_no_module_strip", "models/weights.py", '_WRAPPER_PREFIXES = ("module.", "_orig_mod.")',
           '_WRAPPER_PREFIXES = ("_orig_mod.",)', (_FRONT,), "a DDP 'module.' prefix is not stripped"),
    Mutant("front_num_classes_axis", "models/weights.py", 'where = {"num_classes": (2, 0, True)',
           'where = {"num_classes": (2, 1, True)', (_FRONT,), "num_classes read off the classifier's input axis"),
    Mutant("front_unsafe_load", "models/weights.py", "weights_only=True)\n", "weights_only=False)\n", (_FRONT,),
           "torch.load without weights_only: a pickle runs code"),
    Mutant("front_arch_unchecked", "train/checkpoint.py", "if arch is not None and arch != name:", "if False:",
           (_FRONT,), "an --arch that disagrees with the sidecar is silently ignored"),
    # -- the thesis's layers and the tracer
    Mutant("layers_linear_as_conv", "perm/spec.py", "lab.dim, len(shape) > 2)", "lab.dim, len(shape) >= 2)",
           ("tests/test_layer_selection.py",), "flat (N, C) features counted as conv maps: the probe takes linear layers"),
    Mutant("tracer_skips_splits", "perm/spec.py", "if self._tensor_args(node) and not G.is_metadata_query(node):",
           "if False and self._tensor_args(node) and not G.is_metadata_query(node):", ("tests/test_timm_spec.py",),
           "a split feature map skipped silently (a wrong, non-function-preserving spec)"),
    # -- one CLI vocabulary, stored alignments
    Mutant("config_overrides_flags", "cli/config.py", "            if dest not in given:", "            if True:",
           (f"{_CLI}::test_a_config_file_and_the_same_flags_give_the_same_manifest",),
           "--config wins over the command line"),
    Mutant("help_imports_torch", "cli/parser.py", "import argparse\n", "import argparse\n\nimport torch  # noqa\n",
           (_CLI,), "building the parser imports torch (--help takes seconds)"),
    # -- the study, its overview and the browser (issue 11)
    Mutant("study_key_ignores_config", "studies/study.py", '"config": _stage_config(config, stage),',
           '"config": None,',
           ("tests/test_study.py::test_a_changed_parameter_reruns_its_stage_and_the_stages_that_read_it",),
           "a changed analysis parameter does not invalidate its stored stage"),
    Mutant("overview_obs3_most_in_all", "report/overview.py",
           'pooled = {c: _pooled(rows, f"n_{c}", "channels") for c in O3_CATEGORIES}',
           'pooled = {c: _pooled(rows, "n_most similar" if c == "all similar" else f"n_{c}", "channels") '
           'for c in O3_CATEGORIES}',
           ("tests/test_overview.py::test_observation3_shares_stand_beside_the_thesis_ranges",),
           "the overview shows Observation 3's 'most similar' share as 'all similar'"),
    Mutant("browser_sort_never_reverses", "report/templates/_sortable.html", "return asc ? d : -d;",
           "return asc ? d : d;", ("tests/test_browser.py::test_clicking_a_column_header_sorts_the_channel_table_and_"
                                   "a_second_click_reverses_it",), "a second click on a column header does not reverse"),
    Mutant("channel_sprite_url", "report/templates/_channel_macros.html", 'background-image: url("{{ s.url }}")',
           'background-image: url("x{{ s.url }}")', ("tests/test_browser.py::test_every_image_and_sprite_sheet_resolves",),
           "the channel pages' sprite sheets point nowhere"),
    Mutant("stored_files_unverified", "runs/folder.py", "        if file_sha256(path) != want:", "        if False:",
           (f"{_CLI}::test_a_stored_file_changed_after_the_run_is_refused_by_compare_and_regress",),
           "compare and regress read probe tensors / alignments edited after the run"),
    Mutant("alignment_sources_unchecked", "align/store.py", "if want is not None and file_sha256(path) != want:",
           "if False:", ("tests/test_alignment_store.py",),
           "compare uses a checkpoint that changed since it was aligned"),
    Mutant("null_delta_direction", "compare/null.py", "    q = quantile if higher_is_similar else 1.0 - quantile",
           "    q = quantile", ("tests/test_compare.py", _COMPARE), "the null quantile not flipped for δ (lower = similar)"),
    # -- run folders as a whole (issue 12)
    Mutant("run_written_in_place", "runs/transaction.py",
           "        _fill(staging, final if adds else None)\n        yield Staging(final, staging, resume)\n"
           "        _commit(staging, final)",
           "        final.mkdir(parents=True, exist_ok=True)\n        yield Staging(final, final, resume)",
           (f"{_RUNS}::test_a_full_disk_is_one_line_and_leaves_the_old_run",),
           "a command writes its run folder in place instead of staging it and committing with one rename"),
    Mutant("lock_ignored", "runs/transaction.py", "if pid and pid != os.getpid() and _alive(pid):", "if False:",
           (f"{_RUNS}::test_a_second_writer_is_refused_in_one_line",), "a second writer takes over a live lock"),
    Mutant("disk_full_unnamed", "runs/transaction.py", "    if e.errno in DISK_FULL:\n        return",
           "    if False:\n        return", (f"{_RUNS}::test_a_full_disk_is_one_line_and_leaves_the_old_run",),
           "a full disk is reported as a generic write failure"),
    Mutant("report_renders_unverified", "cli/commands.py", "    verify_inputs(final, manifest)  # pages are made",
           "    pass  # pages are made",
           (f"{_RUNS}::test_a_run_folder_damaged_after_its_run_is_named_by_the_command_that_reads_it",),
           "report re-renders from probe tensors edited after the run and refreshes their hashes"),
    Mutant("checkpoint_pair_unchecked", "train/checkpoint.py",
           "    if want is not None and (sha256 or file_sha256(path)) != want:\n        raise CheckpointError(f\"{path} is not the file",
           "    if False:\n        raise CheckpointError(f\"{path} is not the file",
           (f"{_RUNS}::test_train_writes_again_over_what_a_kill_between_its_two_files_left",),
           "weights are loaded with a sidecar written for other weights"),
    Mutant("fingerprint_blind_to_edits", "data/folder.py", "{st.st_size}\\t{st.st_mtime_ns}\\t", "{st.st_size}\\t",
           (f"{_RUNS}::test_an_image_edited_in_place_changes_the_dataset_fingerprint",),
           "an ImageFolder's fingerprint is path + size only: an image edited in place passes for the old one"),
    Mutant("probe_checkpoint_in_staging", "studies/probe.py", 'checkpoint_dir=staging.resume / "probe"',
           'checkpoint_dir=staging.path / "probe"',
           ("tests/test_bad_input.py::test_a_truncated_pass_checkpoint_is_set_aside_and_the_probe_starts_over",
            f"{_RUNS}::test_an_interrupted_probe_resumes_from_its_last_pass_checkpoint"),
           "the probe's pass checkpoints live in the staging folder, which a kill's cleanup removes: no resume"),
    # -- every data pass on torch.distributed (issue 12, item 4)
    Mutant("shards_overlap", "distributed.py", "mine = batches[first:stop]", "mine = batches[first:stop + 1]",
           (_DIST,), "neighbouring ranks both walk the batch at a boundary"),
    Mutant("shard_drops_last_batch", "distributed.py", "first, stop = batch_range(len(batches), rank, size)",
           "first, stop = batch_range(len(batches) - 1, rank, size)", (_DIST,), "the last batch is walked by no rank"),
    Mutant("merge_skips_rank_1", "distributed.py", "for other in shards[1:]:", "for other in shards[2:]:",
           (_DIST,), "rank 1's accumulators are left out of the combination"),
    Mutant("eval_not_reduced", "evaluate/evaluate.py", "sums = dict(zip(sums, all_reduce(local).unbind()))",
           "sums = dict(zip(sums, local.unbind()))", (f"{_DIST}::test_evaluation_equals_one_process",),
           "each rank reports the accuracy of its own shard"),
    Mutant("train_eval_not_reduced", "train/evaluation.py",
           "all_reduce(loss_sum), all_reduce(correct), int(all_reduce(count))", "loss_sum, correct, int(count)",
           (f"{_DIST}::test_evaluation_equals_one_process",), "evaluate_model reports one shard's accuracy"),
    Mutant("reset_not_shared", "merge/repair.py", "    _share_running_stats([*reset,", "    ([*reset,",
           (f"{_DIST}::test_repair_and_reset_equal_one_process",), "RESET's running averages are one rank's"),
    Mutant("topk_ranges_not_combined", "align/regressed_topk.py", "    if world()[1] == 1:\n        return a_top",
           "    if True:\n        return a_top", (f"{_DIST}::test_regression_fit_and_topk_equal_one_process",),
           "regressed top-k keeps each rank's own top images"),
    # -- the survey's aggregation family and Git Re-Basin's STE (issue 13)
    Mutant("ties_sign_by_count", "merge/task_vectors.py",
           "gamma = {n: torch.sign(sum(t[n] for t in taus)) for n in taus[0]}",
           "gamma = {n: torch.sign(sum(torch.sign(t[n]) for t in taus)) for n in taus[0]}",
           (f"{_AGG}::test_ties_follows_its_three_steps",), "TIES elects the sign by count instead of by mass"),
    Mutant("ties_trims_the_large", "merge/task_vectors.py",
           "torch.where(t.abs() > threshold, t, torch.zeros_like(t))",
           "torch.where(t.abs() < threshold, t, torch.zeros_like(t))",
           (f"{_AGG}::test_ties_follows_its_three_steps",), "TIES keeps the smallest entries"),
    Mutant("dare_no_rescale", "merge/task_vectors.py", "out[n] = t * keep.to(t.device) / (1.0 - p)",
           "out[n] = t * keep.to(t.device)", (f"{_AGG}::test_dare_drops_with_rate_p_and_rescales_the_rest",),
           "DARE drops without rescaling by 1/(1-p)"),
    Mutant("breadcrumbs_one_tail", "merge/task_vectors.py",
           "keep[order[int(beta * size): size - int((1 - gamma) * size)]] = True",
           "keep[order[int(beta * size):]] = True", (f"{_AGG}::test_breadcrumbs_masks_both_tails_per_layer",),
           "Breadcrumbs keeps the largest-magnitude tail"),
    Mutant("regmean_no_offdiagonal_scaling", "merge/regmean.py",
           "return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))", "return gram",
           (f"{_AGG}::test_regmean_of_two_linear_models_is_the_closed_form_solved_by_hand",),
           "RegMean without its off-diagonal scaling α"),
    Mutant("greedy_soup_unsorted", "merge/soups.py",
           "order = sorted(range(len(states)), key=lambda k: -scores[k])", "order = list(range(len(states)))",
           (f"{_AGG}::test_a_greedy_soup_never_scores_below_its_best_ingredient",),
           "the greedy soup adds ingredients in the given order, not by held-out accuracy"),
    Mutant("fisher_uniform_over_classes", "merge/fisher.py", "w = probs[:, y]",
           "w = torch.full_like(probs[:, y], 1.0 / probs.shape[1])",
           (f"{_AGG}::test_fisher_averaging_follows_the_paper",),
           "the Fisher's expectation over classes ignores the model's probabilities"),
    Mutant("swa_keeps_averaged_bn", "merge/methods.py",
           "return recompute_batchnorm(_mean_of(inputs, None), inputs.all_data(), inputs.device)",
           "return _mean_of(inputs, None)",
           (f"{_AGG}::test_swa_is_the_mean_of_the_checkpoints_with_batchnorm_statistics_recomputed",),
           "SWA keeps averaged BatchNorm statistics instead of recomputing them"),
    Mutant("ste_keeps_last_not_best", "merge/ste.py", "if best is None or loss.item() < best[0]:", "if True:",
           ("tests/test_ste.py::test_the_straight_through_estimator_follows_algorithm_2",),
           "STE returns the last permutation, not the one of lowest loss"),
    Mutant("ste_no_straight_through", "merge/ste.py", "+ (t - t.detach()))", "+ 0 * t)",
           ("tests/test_ste.py::test_the_straight_through_estimator_follows_algorithm_2",),
           "STE without the straight-through gradient"),
    Mutant("ranks_not_told_to_stop", "runs/transaction.py",
           "    _agree(error)  # every rank stops here when rank 0 cannot write the folder",
           "    if error:\n        raise MergescopeError(error)",
           (f"{_DIST}::test_torchrun_sweep_equals_one_process",),
           "under torchrun rank 0 refuses the folder alone: the other ranks wait in the pass (the test times out)"),
    # -- lean pages, D' in 16 bits, time by stage (issue 14)
    Mutant("subset_read_back_16bit", "probe/store.py",
           "LayerProbe(values, ids, moments, None if subset is None else subset.float())",
           "LayerProbe(values, ids, moments, subset)",
           ("tests/test_subset_precision.py::test_the_subset_is_stored_in_float16_and_read_back_as_the_float32_the_probe_returned",),
           "the float16 D' matrix is handed on as float16"),
    Mutant("feature_screen_drops_a_channel", "report/templates/_feature_script.html",
           "i < Math.min(n, (page + 1) * per); i++", "i < Math.min(n, (page + 1) * per) - 1; i++",
           ("tests/test_browser.py::test_every_feature_page_draws_every_channel_with_its_tiles",),
           "each screen of a lean feature page leaves out its last channel"),
    Mutant("nested_stage_time_lost", "timing.py", "self._open[-1][1] = now  # the enclosing stage resumes now", "pass",
           ("tests/test_timing.py::test_nested_stages_are_exclusive_and_scopes_add_up",),
           "time by stage: an enclosing stage is not resumed after a nested one"),
    Mutant("feature_data_wrong_image", "report/feature_data.py", "np.searchsorted(images, ids[ids >= 0])",
           "np.searchsorted(images, ids[ids >= 0], side=\"right\")", ("tests/test_feature_data.py",),
           "a tile points at the next image of the sheet"),
    # -- aligned models derived from their unaligned twins' probes (issue 14)
    Mutant("permuted_probe_inverse_order", "probe/result.py",
           "        subset = None if self.subset is None else self.subset[:, order]\n",
           "        order = order.argsort()\n        subset = None if self.subset is None else self.subset[:, order]\n",
           ("tests/test_probe.py::test_permuted_models_are_derived_from_their_source_and_equal_their_own_forward",),
           "a derived probe re-indexed by the inverse permutation"),
    Mutant("moments_reindexed_keep_the_m2_order", "probe/stats.py",
           "self.m2.index_select(0, order)", "self.m2",
           ("tests/test_probe.py::test_permuted_models_are_derived_from_their_source_and_equal_their_own_forward",),
           "re-indexed moments keep each channel's spread in the old order (a derived model's std is another channel's)"),
    Mutant("layer_orders_ignore_the_group", "perm/apply.py",
           "perm = perms.get(point.group) if point.group is not None else None", "perm = None",
           ("tests/test_probe.py::test_permuted_models_are_derived_from_their_source_and_equal_their_own_forward",),
           "every layer's channel order is the identity: aligned rows show the unaligned model"),
    Mutant("study_aligned_from_the_reference", "studies/probe.py", "permuted[aligned_key(t)] = (t, orders)",
           "permuted[aligned_key(t)] = (tags[0], orders)",
           ("tests/test_features.py::test_every_aligned_row_is_what_the_aligned_model_itself_computes",),
           "the study derives every aligned row from the reference's probe"),
    Mutant("compare_reprobe_aligned_from_the_reference", "studies/compare.py",
           "models[t], aligned_models[aligned], (t, orders)", "models[t], aligned_models[aligned], (reference, orders)",
           ("tests/test_compare_study.py::test_compare_cli_on_a_probe_run_folder",),
           "compare's D′ re-probe of an older folder derives every aligned model from the reference"),
    # -- bench-merge (issue 13)
    Mutant("subset_accuracy_over_all_classes", "evaluate/by_class.py",
           "keep = sums if classes is None else sums[:, list(classes)]", "keep = sums",
           ("tests/test_bench_merge.py::test_per_subset_accuracy_is_on_those_classes_test_images",),
           "per-subset accuracy computed over every test image"),
    Mutant("bench_evaluation_not_shared", "studies/bench_merge.py", "groups = [everything]",
           "groups = [{k: m} for k, m in everything.items()]",
           ("tests/test_bench_merge.py::test_evaluation_passes_are_shared_by_every_model_of_a_workload",),
           "every merged model of a workload gets its own evaluation pass"),
    Mutant("soup_passes_miscounted", "studies/plan.py", '"held-out": 2 * n - 1 if combine', '"held-out": n if combine',
           ("tests/test_bench_merge.py::test_merge_plan_counts_the_passes_of_combining_methods",),
           "the greedy soup's held-out evaluations are miscounted"),
    Mutant("finetune_on_all_classes", "studies/train.py",
           "ids = torch.nonzero(keep).flatten() if ids is None else ids[keep[ids]]",
           "ids = torch.nonzero(keep).flatten() if ids is None else torch.nonzero(keep).flatten()",
           ("tests/test_bench_merge.py::test_fine_tunes_start_from_the_base",),
           "--classes ignores the images a part already selected"),
    # -- lean statistics and incremental weight matching (issue 14)
    Mutant("lean_moments_wrong_centre", "probe/stats.py", "    return x3 - rounded.view(1, -1, 1), rounded.double()\n",
           "    return x3 - rounded.mean(), rounded.double()\n",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "a batch with offset channels is centred on the mean over all channels before its products"),
    Mutant("centre_aliases_the_mean", "probe/stats.py",
           "    rounded = mean.to(x3.dtype, copy=True)", "    rounded = mean.to(x3.dtype)",
           ("tests/test_lean_stats.py::test_centred_values_minus_their_offset_are_the_deviations_from_the_mean_float64_too",),
           "a float64 batch's centre is its mean itself, so refining the mean in place zeroes the offset"),
    Mutant("cross_products_uncentred_everywhere", "probe/stats.py",
           "        if redo.numel():\n            values, rounded = _minus_rounded_mean(x3, mean)",
           "        if False:\n            values, rounded = _minus_rounded_mean(x3, mean)",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "matching's cross products taken uncentred even where cancellation loses float32's digits"),
    Mutant("samples_layout_uncentred", "probe/stats.py",
           "    torch.sub(x3.transpose(1, 2), rounded, out=out)", "    torch.sub(x3.transpose(1, 2), 0, out=out)",
           ("tests/test_lean_stats.py::test_channel_layout_moments_equal_samples_moments",),
           "the (samples, C) copy for the cross products is not centred, yet corrected as if it were"),
    Mutant("cross_offset_correction_dropped", "probe/stats.py",
           "            right.append(offsets[1].to(torch.float64) * -n)",
           "            right.append(offsets[1].to(torch.float64) * 0)",
           ("tests/test_lean_stats.py::test_channel_layout_moments_equal_samples_moments", "tests/test_align.py"),
           "uncentred cross products are not corrected by the means (−n·m_a m_bᵀ)"),
    Mutant("joint_offset_correction_dropped", "align/covariance.py",
           "            right.append(offset * -n)", "            right.append(offset * 0)",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",),
           "the joint scatter of uncentred batches is not corrected by the means"),
    Mutant("joint_test_never_fails", "probe/stats.py",
           "    if not redo.numel():\n        return values, mean, mean, own",
           "    if True:\n        return values, mean, mean, own",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "the joint scatter is taken of uncentred batches even where channels sit far from zero"),
    Mutant("joint_own_product_not_retaken", "probe/stats.py",
           "    return values, mean, mean - rounded, products(values, values, by_image)",
           "    return values, mean, mean - rounded, own",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "a centred batch keeps the product with itself of its uncentred values"),
    Mutant("centred_subset_means_misplaced", "probe/stats.py",
           "        mean[redo], m2[redo] = exact_mean, exact_m2",
           "        mean[redo], m2[redo] = exact_mean.flip(0), exact_m2",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "the re-centred channels' batch means are written to each other's places"),
    Mutant("centred_all_m2_misplaced", "probe/stats.py",
           "        mean[redo], m2[redo] = exact_mean[redo], exact_m2[redo]",
           "        mean[redo], m2[redo] = exact_mean[redo], exact_m2.flip(0)[redo]",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "where every channel is re-centred, their m2 are taken from the wrong channels"),
    Mutant("extremes_test_too_tight", "probe/stats.py", "math.sqrt(1.01 * (n - 1) / n)", "math.sqrt(1.01 * (n - 2) / n)",
           ("tests/test_lean_stats.py::test_extremes_counted_only_where_needed_keep_dead_channels_exact",),
           "an all-but-one-equal channel is not recognised as one"),
    Mutant("extremes_settle_all_but_one_equal", "probe/stats.py",
           "settled = m2.double().sqrt().to(bound.device) > bound",
           "settled = m2.double().sqrt().to(bound.device) > 0.5 * bound",
           ("tests/test_lean_stats.py::test_settled_channels_are_not_read_again_and_dead_masks_stay_exact",),
           "a channel that fires on one sample is settled as informative"),
    Mutant("extremes_settled_read_again", "probe/stats.py",
           "        if channels is None:\n            channels = self.open\n", "",
           ("tests/test_lean_stats.py::test_settled_channels_are_not_read_again_and_dead_masks_stay_exact",),
           "every batch is read for every channel's extremes, settled or not"),
    Mutant("extremes_subset_counts_misplaced", "probe/stats.py",
           "read = maybe if channels is None else channels[maybe]", "read = maybe",
           ("tests/test_lean_stats.py::test_settled_channels_are_not_read_again_and_dead_masks_stay_exact",),
           "the open channels' counts are taken from the wrong channels"),
    Mutant("allocator_large_blocks_mapped", "_allocator.py",
           "(_M_TOP_PAD, 64 * 1024 * 1024), (_M_MMAP_MAX, 0)))", "(_M_TOP_PAD, 64 * 1024 * 1024)))",
           ("tests/test_allocator.py",),
           "blocks above glibc's mmap threshold are mapped afresh and fault their pages in again every batch"),
    Mutant("wm_incremental_sign", "align/weight_matching.py",
           "d_s.append(_pick(b_l, rows, new[s]) - _pick(b_l, rows, old[s]))",
           "d_s.append(_pick(b_l, rows, old[s]) - _pick(b_l, rows, new[s]))",
           ("tests/test_lean_stats.py::test_incremental_cost_updates_equal_full_recomputation",),
           "weight matching's incremental cost update subtracts the wrong way"),
    Mutant("wm_all_of_A_when_half_moved", "align/weight_matching.py",
           "None if len(s) == len(new) else s", "None if 2 * len(s) >= len(new) else s",
           ("tests/test_lean_stats.py::test_incremental_cost_updates_equal_full_recomputation",),
           "the incremental update multiplies all of A's channels when only half of them moved"),
    Mutant("wm_layout_other_first_order", "align/weight_matching.py",
           "    if first.is_contiguous() or o_ax.axis != 0:", "    if first.is_contiguous():",
           ("tests/test_align.py::test_weight_layouts_gather_the_channels_of_the_flat_weight",),
           "a weight's stored layout picks the wrong channels for an input axis"),
    Mutant("wm_lap_cost_potentials", "align/weight_matching.py",
           "    w = np.full(x.shape[1], -np.inf, np.float32)  # (C,)", "    w = np.zeros(x.shape[1], np.float32)  # (C,)",
           ("tests/test_align.py::test_lap_cost_has_the_optimum_of_the_similarity_exactly",),
           "the solver's column potentials start from 0 instead of −∞ (wrong for all-negative columns)"),
    # -- the Q1 answer (smallest accuracy barrier, not best midpoint)
    Mutant("q1_selects_best_midpoint", "report/headline.py",
           'return min(_merges(stats, split), key=lambda s: (s["accuracy_barrier"], -_midpoint_or_lowest(s)), default=None)',
           "return max(_merges(stats, split), key=_midpoint_or_lowest, default=None)",
           ("tests/test_report.py::test_headline_features_the_smallest_barrier_not_the_best_midpoint",
            "tests/test_overview.py::test_q1_answer_is_the_smallest_barrier_not_the_best_midpoint"),
           "Q1 names the merge with the best accuracy at α = 0.5 instead of the smallest barrier"),
    Mutant("q1_tie_lower_midpoint", "report/headline.py",
           'key=lambda s: (s["accuracy_barrier"], -_midpoint_or_lowest(s))',
           'key=lambda s: (s["accuracy_barrier"], _midpoint_or_lowest(s))',
           ("tests/test_report.py::test_headline_breaks_equal_barriers_by_the_higher_midpoint",
            "tests/test_overview.py::test_q1_answer_ties_and_the_direct_average_alone"),
           "equal barriers go to the lower midpoint accuracy"),
    Mutant("headline_own_endpoints", "report/headline.py",
           "stats = barriers(rows, endpoints)", "stats = barriers(rows)",
           ("tests/test_report.py::test_headline_features_the_smallest_barrier_not_the_best_midpoint",),
           "the headline measures barriers against each method's own α = 0 / 1 values, not models A and B"),
    Mutant("q1_keeps_nan_barrier", "report/headline.py",
           '            and not math.isnan(s["accuracy_barrier"])]', "            ]",
           ("tests/test_report.py::test_headline_skips_a_merge_whose_barrier_is_nan",
            "tests/test_overview.py::test_q1_answer_is_the_smallest_barrier_not_the_best_midpoint"),
           "a merge whose barrier is NaN can be named Q1's answer"),
    # -- the joint covariance's float32 blocks (issue 14)
    Mutant("joint_chan_correction_dropped", "align/covariance.py",
           "            right.append(delta * (self.n * n / total))", "            right.append(delta * 0.0)",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",
            "tests/test_regression.py::test_streamed_statistics_do_not_depend_on_batching"),
           "batches' scatters added without Chan et al.'s between-means term"),
    Mutant("joint_first_row_block_only", "probe/blocks.py",
           "        spans = [slice(i, i + step) for i in range(0, xm.shape[1], step)]",
           "        spans = [slice(0, step)]",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",
            "tests/test_lean_stats.py::test_held_maps_are_copied_channel_major_and_give_every_batchs_statistics"),
           "only the first block of rows of a batch (or of a held group's samples) enters the scatter"),
    Mutant("gram_lower_blocks_not_mirrored", "probe/blocks.py",
           "            out[rows.stop:, rows] = out[rows, rows.stop:].T", "            pass",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",
            "tests/test_lean_stats.py::test_held_maps_are_copied_channel_major_and_give_every_batchs_statistics"),
           "a batch's product with itself leaves the blocks below its diagonal slabs unwritten"),
    Mutant("gram_diagonal_slabs_only", "probe/blocks.py",
           "        slabs = [(slice(p, p + size), slice(p, None)) for p in range(0, cx, size)]",
           "        slabs = [(slice(p, p + size), slice(p, p + size)) for p in range(0, cx, size)]",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",),
           "a batch's product with itself multiplies only the slabs' diagonal blocks"),
    Mutant("held_batches_overwrite_each_other", "probe/blocks.py",
           "                buf[:, self.rows:self.rows + n].view(", "                buf[:, :n].view(",
           ("tests/test_lean_stats.py::test_held_maps_are_copied_channel_major_and_give_every_batchs_statistics",),
           "each held map batch is copied over the start of the buffer instead of after the ones before it"),
    Mutant("joint_lower_block_never_written", "align/covariance.py",
           "                self._scatter[ca:, :ca] = self._scatter[:ca, ca:].T",
           "                pass",
           ("tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter",
            "tests/test_oracle_maps.py"),
           "Σ_BA is left unwritten (the scatter's lower block holds garbage)"),
    Mutant("joint_read_then_updated_stale", "align/covariance.py",
           "        self._lower_stale = self._scatter is not None  # Σ_BA is rewritten when the whole matrix is next read",
           "        self._lower_stale = False",
           ("tests/test_lean_stats.py::test_joint_moments_blocks_and_the_assembled_scatter_stay_consistent_across_updates",),
           "batches added after the whole scatter was read leave its lower block Σ_BA stale"),
    Mutant("add_into_slices_skip_a_row", "probe/blocks.py",
           "        total[i:i + rows].add_(chunk.copy_(part[i:i + rows]))",
           "        total[i:i + rows - 1].add_(chunk[:-1].copy_(part[i:i + rows - 1]))",
           ("tests/test_lean_stats.py::test_add_into_adds_float32_into_float64_exactly_in_cache_sized_slices",
            "tests/test_lean_stats.py::test_joint_moments_float32_products_match_the_written_out_scatter"),
           "the float32 → float64 add leaves out the last row of every slice"),

    Mutant("dataset_opening_untimed", "data/open.py",
           '@staged("decode")  # a pack or a small tree is decoded here, once\n', "",
           ("tests/test_timing.py::test_opening_a_dataset_is_charged_to_decode",),
           "decoding a pack when it is opened is charged to no stage (it shows as 'other')"),
    Mutant("co_update_reference_moments_of_b", "probe/stats.py",
           "        st.a._combine(n, ma, m2a)", "        st.a._combine(n, mb, m2b)",
           ("tests/test_align.py", "tests/test_lean_stats.py"),
           "matching's shared update gives the reference the other model's moments"),

    Mutant("joint_last_group_dropped", "align/covariance.py",
           "        gathered.flush()\n", "        pass\n",
           ("tests/test_lean_stats.py::test_batches_with_few_positions_are_added_in_groups",
            "tests/test_regression.py::test_streamed_statistics_do_not_depend_on_batching"),
           "the batches still held back at the end of the covariance pass are never added"),
    # -- lean pass statistics, continued (issue 14)
    Mutant("matching_last_group_dropped", "align/activation_matching.py",
           "        gathered.flush()\n", "        pass\n",
           ("tests/test_lean_stats.py::test_matching_adds_linear_layers_in_groups_and_gets_the_one_batch_correlations",),
           "the batches matching still holds back at the end of its pass are never added"),
    Mutant("one_read_variance_everywhere", "probe/stats.py",
           "    return mean, m2, (m2 * limit < q).nonzero().flatten()",
           "    return mean, m2, (m2 < 0).nonzero().flatten()",
           ("tests/test_lean_stats.py::test_one_read_moments_are_float32_accurate_at_any_offset",),
           "the variance is taken as Σx² − n·mean² even where cancellation loses float32's digits"),
    Mutant("float64_limit_for_float32_sums", "probe/stats.py",
           "    wide = x3.dtype == torch.float64 or (x3.shape[2] == 1 and not products)", "    wide = True",
           ("tests/test_lean_stats.py::test_one_read_moments_are_float32_accurate_at_any_offset",),
           "the one-read variance's float64 limit (2^20) applied to per-image float32 sums"),
    Mutant("products_take_the_float64_limit", "probe/stats.py",
           "    wide = x3.dtype == torch.float64 or (x3.shape[2] == 1 and not products)",
           "    wide = x3.dtype == torch.float64 or x3.shape[2] == 1",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "float32 cross products of one value per image taken uncentred under the float64 sums' limit"),
    Mutant("centred_m2_about_the_rounded_mean", "probe/stats.py",
           "    return centre + shift, q - s * shift", "    return centre + shift, q",
           ("tests/test_lean_stats.py::test_one_read_moments_are_float32_accurate_at_any_offset",),
           "a centred channel's m2 is taken about its rounded mean (off by n·(mean − m̃)², 0.2% at 10⁶σ)"),
    Mutant("centred_mean_not_refined", "probe/stats.py",
           "    return centre + shift, q - s * shift", "    return centre, q - s * shift",
           ("tests/test_lean_stats.py::test_one_read_moments_are_float32_accurate_at_any_offset",),
           "a centred channel's batch mean stays the per-image float32 one (Chan's term carries its error)"),
    Mutant("cross_centred_mean_not_refined", "probe/stats.py",
           "        mean[redo], m2[redo] = exact_mean, exact_m2",
           "        m2[redo] = exact_m2",
           ("tests/test_lean_stats.py::test_uncentred_cross_products_are_float32_accurate_at_any_offset",),
           "a few centred channels keep the per-image float32 mean (Chan's term then carries ~1e-5σ at 1,000σ)"),
    Mutant("probe_subset_compacted_together", "probe/state.py",
           "[compact_subset(part).cpu().float() for part in self.subset.split(self.sizes, dim=1)]",
           "list(compact_subset(self.subset).cpu().float().split(self.sizes, dim=1))",
           ("tests/test_subset_precision.py::test_the_probe_state_keeps_each_layer_in_its_own_16_bit_format",),
           "one layer beyond float16's range puts every layer's D' into bfloat16"),
    Mutant("probe_nan_check_dropped", "probe/state.py",
           "        if not bool(torch.isfinite(batch_mean).all()):", "        if False:",
           ("tests/test_probe.py::test_probe_nan_activations_name_model_and_layer",),
           "NaN activations pass into the probe's top-k and moments unnoticed"),
    Mutant("topk_negative_order_kept", "probe/topk.py", "    order &= _MANTISSA_AND_EXP\n", "",
           ("tests/test_probe.py::test_streaming_topk_matches_brute_force_for_any_batching",),
           "negative activations' keys keep their bits, so more negative ranks higher"),
    Mutant("probe_bfloat16_ignored", "probe/engine.py", "torch.autocast(device.type, dtype=autocast))",
           "torch.autocast(device.type, dtype=autocast, enabled=False))",
           ("tests/test_probe.py::test_bfloat16_probe_runs_the_forward_in_bfloat16_and_is_stored_apart",),
           "--precision bfloat16 is accepted and recorded, but the forward runs in float32"),
    Mutant("probe_precision_not_in_config", "probe/probe.py", '        "precision": precision,\n',
           '        "precision": "float32",\n',
           ("tests/test_probe.py::test_bfloat16_probe_runs_the_forward_in_bfloat16_and_is_stored_apart",),
           "a stored float32 probe is reused for a bfloat16 request (and the other way round)"),
    Mutant("device_decode_resize_aliased", "data/device_decode.py", "F.resize(img, IMAGENET_RESIZE, antialias=True)",
           "F.resize(img, IMAGENET_RESIZE, antialias=False)",
           ("tests/test_device_decode.py::test_imagenet_tree_decoded_on_the_device_equals_the_workers_pillow_batches",),
           "--decode device resizes without antialiasing: its pixels are no longer Pillow's"),
    Mutant("device_decode_size_unchecked", "data/device_decode.py",
           "        if tuple(img.shape[1:]) != tuple(size):", "        if False:",
           ("tests/test_device_decode.py::test_small_tree_on_the_device_keeps_the_size_rule_and_names_bad_files",),
           "--decode device lets an image of another size into a small tree's batch"),
    # -- lean pages: native-size tiles, SVG histograms (issue 14, item 2)
    Mutant("feature_tile_scale_js", "report/templates/_feature_script.html",
           "var s = Math.max(1, Math.floor(D.tile / Math.max(sheet.w, sheet.h)));",
           "var s = Math.max(1, Math.floor(D.tile / Math.max(sheet.w, sheet.h)) - 1);",
           ("tests/test_browser.py::test_a_small_images_tile_is_drawn_at_the_size_and_place_of_its_56_px_tile",),
           "a feature page draws native-size tiles at the wrong scale"),
    Mutant("tile_scale_drawn", "report/sprites.py",
           "    s = max(1, size // max(tile.w, tile.h))", "    s = max(1, size // max(tile.w, tile.h) - 1)",
           ("tests/test_feature_data.py::test_every_tile_a_page_draws_is_the_tile_image_of_its_image",),
           "tiles are drawn at the wrong scale"),
    Mutant("feature_tile_border_left_top_only", "report/templates/_feature_script.html",
           'sheet.border = border.some(Boolean) ? border.join("px ") + "px" : "";',
           'sheet.border = border[0] || border[3] ? border.join("px ") + "px" : "";',
           ("tests/test_browser.py::test_a_small_images_tile_is_drawn_at_the_size_and_place_of_its_56_px_tile",),
           "a border only on the right and bottom of a tile is dropped"),
    Mutant("channel_tile_offsets_unscaled", "report/channel_pages.py",
           'cells.append({"sheet": n, "x": d.x, "y": d.y, "id": i, "value": v})',
           'cells.append({"sheet": n, "x": t.x, "y": t.y, "id": i, "value": v})',
           ("tests/test_overview.py::test_channel_page_shows_every_model_metric_and_regression",),
           "channel pages place tiles at unscaled sheet offsets"),
    Mutant("histogram_outline_shifted", "report/svg_plot.py",
           '[f"V{sy(c[i]):.1f}H{sx(e[i + 1]):.1f}" for i in range(len(c))]',
           '[f"V{sy(c[i - 1]):.1f}H{sx(e[i + 1]):.1f}" for i in range(len(c))]',
           ("tests/test_report.py::test_metric_histograms_are_an_svg_whose_outlines_are_the_counts",),
           "a comparison histogram's outline is shifted by one bin"),
    Mutant("svg_log_axis_linear", "report/svg_plot.py",
           "t = math.log10(v) if self.log else v", "t = v",
           ("tests/test_svg_plot.py",),
           "a log axis places values linearly (its ticks still say powers of ten)"),
    Mutant("svg_line_joined_over_gap", "report/svg_plot.py",
           "            elif run:\n                runs.append(run)", "            elif run and False:\n                runs.append(run)",
           ("tests/test_svg_plot.py",),
           "a line is drawn across a missing (NaN) value instead of breaking there"),
    Mutant("svg_bars_from_smallest", "report/svg_plot.py",
           "x0, x1, yc = sx(0), sx(v), sy(k)", "x0, x1, yc = sx(min(item.values)), sx(v), sy(k)",
           ("tests/test_svg_plot.py",),
           "bars start at the smallest value instead of 0, so their lengths misstate the accuracies"),

)


def _mutated(root: Path, m: Mutant) -> str:
    """The text of ``m.file`` under ``root`` with the mutant's edit; an edit that does not apply once is an error."""
    text = (root / "src" / "mergescope" / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutant '{m.name}' no longer applies: its text occurs {count} times in {m.file}")
    return text.replace(m.old, m.new)


def _run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, float]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        passed = proc.returncode == 0
    except subprocess.TimeoutExpired:
        passed = False  # a mutant that hangs the tests is caught (by the timeout)
    return passed, time.perf_counter() - start


def _scratch(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    for part in ("src", "tests", "examples"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        known = ", ".join(m.name for m in MUTANTS)
        raise SystemExit(f"error: unknown mutant in --only; known: {known}")
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.file}: {m.why}\n{'':32s} caught by {' '.join(m.tests)}")
        return
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        base = Path(tmp)
        for m in mutants:  # every edit must apply to today's code before anything runs
            _mutated(ROOT, m)
        clean = _scratch(base)
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        ok, secs = _run_tests(clean, tests, args.timeout)
        print(f"unmutated: {'pass' if ok else 'FAIL'} ({len(tests)} test targets, {secs:.0f} s)", flush=True)
        if not ok:
            raise SystemExit("error: the tests fail without any mutant; fix them first")
        killed = 0
        for m in mutants:
            root = _scratch(base)
            (root / "src" / "mergescope" / m.file).write_text(_mutated(root, m))
            passed, secs = _run_tests(root, m.tests, args.timeout)
            killed += not passed
            print(f"{'killed ' if not passed else 'SURVIVED'} {m.name:32s} {secs:6.0f} s  {m.why}", flush=True)
            shutil.rmtree(root)
    print(f"killed {killed} / {len(mutants)}")


if __name__ == "__main__":
    main()
