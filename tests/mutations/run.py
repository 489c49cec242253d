"""Mutation harness: plants plausible bugs one at a time in a scratch copy of the repo and checks that
the tests meant to catch each one fail.

    python tests/mutations/run.py                 # all of them: 33 min on the shared 2-core machine
    python tests/mutations/run.py --list          # names, areas, targets
    python tests/mutations/run.py --only NAME ... # some of them
    python tests/mutations/run.py --no-baseline   # skip the unmutated run of the selected tests

Each mutation is a textual edit of one source file (each target snippet must occur exactly once, so
the harness stops loudly when code moves) plus the test node ids that must catch it. The tree is
copied once to a temporary folder; before the mutations, the selected tests run there unmutated and
must pass (otherwise "caught" would mean nothing). Then each mutation is applied, its tests run with
`python -m pytest -x -q`, and the file is restored. Exit status 1 from pytest is "caught", 0 is
"survived", anything else (a renamed test, a collection error) is an error and counts as survived.
Prints a table and, as its last line, `N caught, M survived`; exits 0 only when every one is caught.
Not part of the CI suite (.ci/run): it is slow by nature.

Why not mutmut: it mutates operators everywhere (thousands of mutants) and reruns a test command per
mutant; with a JAX suite that compiles for seconds per test that is days on this machine, and most
of its mutants (a changed string in an error message, a constant in a tqdm call) say nothing about
the bugs that matter here. A curated list of semantic bugs with the tests that own them is cheaper
and says what each test is for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    area: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (snippet that must occur exactly once, replacement)
    tests: tuple[str, ...]  # pytest node ids that must fail
    from_issue: bool = False  # one of the bugs issue 19 found surviving or barely caught


def M(name, area, file, old, new, *tests, from_issue=False, more=()):
    return Mutation(name, area, file, ((old, new), *more), tuple(tests), from_issue)


MODEL, ATTN, LAYOUT = "llama_jax/model.py", "llama_jax/attention.py", "llama_jax/layout.py"
ENGINE, CLI, RULES = "llama_jax/generate/engine.py", "llama_jax/generate/__main__.py", "sharding/rules.py"
STEP, DATA, TOK = "train/step.py", "train/data/rows.py", "llama_jax/tokenizer.py"
T_MODEL, T_GEN, T_CONV = "tests/test_model.py::", "tests/test_generate.py::", "tests/test_convert.py::"
T_STEP, T_DATA, T_SHARD = "tests/test_train_step.py::", "tests/test_train_data.py::", "tests/test_sharding.py::"
T_RUN, T_TOK = "tests/test_train_run.py::", "tests/test_tokenizer.py::"
BATCHER, APP = "llama_jax/generate/batcher.py", "llama_jax/serve/app.py"
PROTOCOL = "llama_jax/serve/protocol.py"
BAD_REQUEST = "tests/test_serve.py::test_bad_requests_get_openai_errors_and_the_server_keeps_answering"
SHORT_ERRORS = "tests/test_serve.py::test_short_errors_and_one_log_line_per_client_gone_mid_body"
ISOLATION = "tests/test_batcher.py::test_a_failing_request_ends_alone_and_the_others_equal_generate_alone"
T_FAM, T_CTX = "tests/test_family.py::", "tests/test_context.py::"
PRETOK, T_PRETOK = "train/data/pretokenize.py", "tests/test_tokenize_safety.py::"
OBJ, PREF = "train/objectives.py", "llama_jax/preference.py"
T_PREF, T_PREF_DATA = "tests/test_preference.py::", "tests/test_preference_data.py::"
PREF_HF = T_PREF + "test_losses_and_gradients_equal_the_papers_formulas_on_hf"
HF_GQA = T_MODEL + "test_logits_match_hf_transformers[tiny-gqa-10000.0]"
LAYOUTS = T_SHARD + "test_every_parameter_kind_gets_the_hand_written_layout"
TRAIN_RUN = T_RUN + "test_train_cli_alpaca_eval_epochs_warmup_keep_mfu_and_init_from"

MUTATIONS = [
    # --- the seven that survived issue 19's mutation run, and the five it caught only narrowly
    M("rope-in-bf16", "RoPE/precision", MODEL,
      "angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq",
      "angles = positions.astype(x.dtype)[:, :, None, None] * inv_freq.astype(x.dtype)",
      T_MODEL + "test_rope_on_bf16_inputs_rotates_in_float32", from_issue=True,
      more=(("x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)", "x1, x2 = jnp.split(x, 2, axis=-1)"),)),
    M("meta-wo-split-dim-0", "conversion layout", LAYOUT, '"heads_in", 1)', '"heads_in", 0)',
      T_CONV + "test_meta_shards_match_hf[2-tiny-gqa-dtype1]", from_issue=True),
    M("adamw-decays-norms", "optimizer mask", STEP,
      'return not any("norm" in str(getattr(k, "key", k)) for k in path)', "return True",
      T_STEP + "test_weight_decay_skips_exactly_the_rmsnorm_weights", from_issue=True),
    M("sampler-ignores-top-k", "sampling", ENGINE, "p, order = _sorted_filtered(probs, top_p, top_k)",
      "p, order = _sorted_filtered(probs, top_p, jnp.int32(0))",
      T_GEN + "test_decode_loop_top_k_support_and_frequencies", from_issue=True),
    M("decode-key-reused", "sampling", ENGINE, 'sample(_step_keys(s["row_keys"], step)',
      'sample(_step_keys(s["row_keys"], 0)', T_GEN + "test_decode_loop_keys_differ_per_step_and_per_row",
      from_issue=True),
    M("mlp-not-sharded", "sharding rules", RULES, '"mlp": ("tensor",),', '"mlp": (),', LAYOUTS, from_issue=True),
    M("chat-wipes-history", "generate CLI", CLI, "del history[first:first + 2]", "del history[first:]",
      T_GEN + "test_chat_history_drops_only_the_oldest_turns", from_issue=True),
    M("norm-weight-dropped", "model", MODEL,
      "return normed.astype(self.cfg.compute_dtype) * weight.astype(self.cfg.compute_dtype)",
      "return normed.astype(self.cfg.compute_dtype)", HF_GQA, from_issue=True),
    M("top-p-boundary-strict", "sampling", ENGINE, "(preceding <= top_p)", "(preceding < top_p)",
      T_GEN + "test_top_p_kept_set_hand_made", from_issue=True),
    M("meta-rope-permutation-removed", "conversion layout", "llama_jax/convert/sources.py",
      "piece = layout.meta_to_hf_rows(piece.view(plain), heads // n).view(dtype)", "piece = piece",
      T_CONV + "test_meta_shards_match_hf[1-tiny-dtype0]", from_issue=True),
    M("loss-mask-shifted", "loss/mask", DATA, 'rows["loss_mask"][:, 1:] * same_segment',
      'rows["loss_mask"][:, :-1] * same_segment', T_STEP + "test_loss_and_adamw_update_match_hf_and_torch",
      from_issue=True),
    M("history-never-trimmed", "generate CLI", CLI, 'while mode == "chat" and len(ids)',
      'while mode == "never" and len(ids)', T_GEN + "test_chat_history_drops_only_the_oldest_turns",
      from_issue=True),
    # --- model
    M("gqa-tiled-not-grouped", "model", ATTN, "q = q.reshape(b, t, kv, h // kv, hd)",
      "q = q.reshape(b, t, h // kv, kv, hd).swapaxes(2, 3)", HF_GQA),
    M("attention-scale", "model", ATTN, "preferred_element_type=jnp.float32) * hd**-0.5",
      "preferred_element_type=jnp.float32) * hd**-0.25", "tests/test_attention.py::test_xla_matches_reference_with_gqa_and_segments"),
    M("causal-mask-excludes-self", "model", ATTN, "(jnp.arange(s)[None, :] <= query_index[:, None])",
      "(jnp.arange(s)[None, :] < query_index[:, None])", "tests/test_attention.py::test_xla_matches_reference_with_gqa_and_segments"),
    M("swiglu-gate-swapped", "model", MODEL,
      'gate = jax.nn.silu(project(self, "w1", x, embed, mlp)) * project(self, "w3", x, embed, mlp)',
      'gate = jax.nn.silu(project(self, "w3", x, embed, mlp)) * project(self, "w1", x, embed, mlp)', HF_GQA),
    M("logits-in-compute-dtype", "RoPE/precision", MODEL, 'logits = constrain(logits, ',
      'logits = constrain(logits.astype(cfg.compute_dtype), ', T_MODEL + "test_bf16_compute_is_close_to_float32_reference"),
    M("rmsnorm-statistics-in-bf16", "RoPE/precision", MODEL, "x32 = x.astype(jnp.float32)", "x32 = x",
      T_MODEL + "test_rmsnorm_on_bf16_inputs_takes_statistics_in_float32"),
    # --- RoPE
    M("rope-interleaved-pairs", "RoPE/precision", MODEL, "x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)",
      "x1, x2 = x.astype(jnp.float32)[..., ::2], x.astype(jnp.float32)[..., 1::2]",
      T_MODEL + "test_rope_matches_independent_formula"),
    M("rope-frequency-exponent", "RoPE/precision", MODEL, "jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)",
      "jnp.arange(0, hd, 2, dtype=jnp.float32) / (2 * hd))", T_MODEL + "test_rope_matches_independent_formula"),
    M("rope-theta-ignored", "RoPE/precision", MODEL, "inv_freq = 1.0 / (cfg.rope_theta **",
      "inv_freq = 1.0 / (10000.0 **", T_MODEL + "test_logits_match_hf_transformers[tiny-gqa-1000000.0]"),
    M("rope-linear-scaling-ignored", "RoPE/precision", MODEL, "return inv_freq / scaling.factor", "return inv_freq",
      T_FAM + "test_logits_and_greedy_tokens_equal_transformers[llama2-linear]"),
    M("rope-llama3-band-edge", "RoPE/precision", MODEL, "slowed = jnp.where(wavelen > context / low,",
      "slowed = jnp.where(wavelen > context / high,",
      T_FAM + "test_logits_and_greedy_tokens_equal_transformers[llama3.1]"),
    M("rope-llama3-blend-inverted", "RoPE/precision", MODEL,
      "blended = (1 - smooth) * slowed / factor + smooth * slowed",
      "blended = smooth * slowed / factor + (1 - smooth) * slowed",
      T_FAM + "test_rope_frequencies_equal_transformers"),
    M("tied-output-transposed-wrong", "model", MODEL, "output = embedding.T",
      "output = embedding.reshape(cfg.dim, cfg.vocab_size)",
      T_FAM + "test_logits_and_greedy_tokens_equal_transformers[llama3.2-tied]"),
    # --- conversion layouts
    M("meta-wk-permuted-with-n-heads", "conversion layout", LAYOUT, '"heads_out", 0, "n_kv_heads")',
      '"heads_out", 0, "n_heads")', T_CONV + "test_meta_shards_match_hf[2-tiny-gqa-dtype1]"),
    M("export-wo-not-transposed", "conversion layout", LAYOUT, "out = w.reshape(-1, cfg.dim).T",
      "out = w.reshape(cfg.dim, -1)", T_CONV + "test_hf_round_trip[True-60KB-dtype0-False]"),
    M("convert-dtype-ignored", "conversion layout", "llama_jax/convert/streaming.py", "    if dtype is None:\n",
      "    if True:\n", T_CONV + "test_dtype_bfloat16_casts_like_torch"),
    M("verify-layers-ignored", "conversion layout", "llama_jax/convert/reference.py",
      "n = cfg.n_layers if layers is None else", "n = cfg.n_layers if True else",
      T_CONV + "test_verify_and_verify_layers_for_hf_and_export_hf"),
    # --- loss and masks
    M("ce-ignores-weights", "loss/mask", STEP, "ce = jnp.sum((lse - target_logit) * w)", "ce = jnp.sum(lse - target_logit)",
      T_STEP + "test_loss_and_adamw_update_match_hf_and_torch"),
    M("z-loss-not-squared", "loss/mask", STEP, "z = jnp.sum(jnp.square(lse) * w)", "z = jnp.sum(lse * w)",
      T_STEP + "test_z_loss_value_and_gradient_match_torch"),
    M("alpaca-last-prompt-token-a-target", "loss/mask", TOK, "[0] * n_prompt + [1] * (len(full) - n_prompt)",
      "[0] * (n_prompt - 1) + [1] * (len(full) - n_prompt + 1)",
      T_DATA + "test_alpaca_example_masks_bos_and_prompt_and_keeps_eos"),
    M("accumulation-keeps-last-microbatch", "loss/mask", STEP, "return jax.tree.map(jnp.add, carry, (g, s)), None",
      "return (g, s), None", T_STEP + "test_gradient_accumulation_equals_big_batch"),
    # (RoPE is relative, so logits barely see this one: the spec test of the packed table catches it)
    M("packed-positions-continue", "loss/mask", DATA, "= seg, np.arange(end - start)", "= seg, np.arange(start, end)",
      T_DATA + "test_build_rows_pack_places_whole_examples_greedily"),
    M("pack-ignored", "loss/mask", DATA, "rows = pack_rows(examples, row_len) if pack else", "rows = pad_rows(examples, row_len) if pack else",
      T_DATA + "test_build_rows_pack_places_whole_examples_greedily"),
    # --- optimizer masks and schedules
    M("adamw-skips-embeddings-too", "optimizer mask", STEP,
      'return not any("norm" in str(getattr(k, "key", k)) for k in path)',
      'return not any(n in str(getattr(k, "key", k)) for k in path for n in ("norm", "tok_embeddings"))',
      T_STEP + "test_weight_decay_skips_exactly_the_rmsnorm_weights"),
    M("no-gradient-clipping", "optimizer mask", STEP,
      "return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw", "return adamw",
      T_STEP + "test_loss_and_adamw_update_match_hf_and_torch"),
    M("warmup-starts-at-lr", "schedule", STEP, "optax.linear_schedule(0.0, lr, warmup_steps)",
      "optax.linear_schedule(lr, lr, warmup_steps)", T_STEP + "test_schedule_and_decay_mask"),
    M("cosine-decays-to-zero", "schedule", STEP, "alpha=min_lr_ratio", "alpha=0.0", T_STEP + "test_schedule_and_decay_mask"),
    M("warmup-ratio-ignored", "schedule", STEP, "else int(math.ceil(warmup_ratio * steps))", "else 0",
      T_STEP + "test_schedule_and_decay_mask"),
    M("epochs-round-down", "schedule", "train/loop.py", "int(math.ceil(cfg.epochs * batches.per_epoch))",
      "int(cfg.epochs * batches.per_epoch)", TRAIN_RUN),
    M("keep-checkpoints-ignored", "resume", "llama_jax/checkpoint/runs.py", "max_to_keep=keep", "max_to_keep=None",
      TRAIN_RUN),
    # --- sampling
    M("temperature-multiplies", "sampling", ENGINE, "probs = jax.nn.softmax(shifted / safe_t, axis=-1)",
      "probs = jax.nn.softmax(shifted * safe_t, axis=-1)", T_GEN + "test_decode_loop_temperature_scales_logits[0.5]"),
    M("one-key-for-every-row", "sampling", ENGINE, "(seed_key, jnp.arange(b))", "(seed_key, jnp.zeros(b, jnp.int32))",
      T_GEN + "test_decode_loop_keys_differ_per_step_and_per_row"),
    M("first-decode-step-reuses-prefill-key", "sampling", ENGINE, 'sample(_step_keys(s["row_keys"], step)',
      'sample(_step_keys(s["row_keys"], step - 1)', T_GEN + "test_decode_loop_keys_differ_per_step_and_per_row"),
    # --- KV cache
    M("decode-position-off-by-one", "KV cache", ENGINE, 'positions = (s["lengths"] + step - 1)[:, None]',
      'positions = (s["lengths"] + step)[:, None]', T_GEN + "test_greedy_ragged_batch_equals_hf_with_logprobs_and_echo"),
    M("cache-mask-excludes-self", "KV cache", MODEL, "mask = slots[None, None, :] <= positions[:, :, None]",
      "mask = slots[None, None, :] < positions[:, :, None]", T_GEN + "test_cache_logits_equal_full_forward_every_step[tiny]"),
    M("prefill-chunk-positions-restart", "KV cache", ENGINE,
      "positions = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (b, n))",
      "positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))",
      T_GEN + "test_chunked_prefill_equals_one_step_prefill_and_hf"),
    M("prefill-last-logits-of-the-last-chunk", "KV cache", ENGINE,
      "last = jnp.where(((at >= 0) & (at < n))[:, None], picked, last)", "last = picked",
      T_GEN + "test_chunked_prefill_equals_one_step_prefill_and_hf"),
    M("only-the-first-end-token", "end tokens", ENGINE, "t < 0 or t in eos_ids]", "t < 0 or t in eos_ids[:1]]",
      T_GEN + "test_eos_stops_each_row_and_max_length"),
    M("batcher-only-the-first-end-token", "end tokens", "llama_jax/generate/batcher.py",
      "if token in self.eos_ids:", "if token in self.eos_ids[:1]:",
      "tests/test_batcher.py::test_chunked_prefill_admission_equals_generate_alone"),
    M("generation-config-end-tokens-ignored", "end tokens", TOK,
      'listed = _json_file(files, GENERATION_CONFIG, name).get("eos_token_id")', "listed = None",
      T_FAM + "test_llama31_end_tokens_stop_every_entry_point_as_transformers"),
    M("converter-drops-the-model-generation-config", "end tokens", "llama_jax/convert/streaming.py",
      "tokenizer = with_end_tokens(tokenizer, source)", "pass",
      T_FAM + "test_llama31_end_tokens_stop_every_entry_point_as_transformers"),
    M("cache-batch-not-sharded", "KV cache", MODEL, 'CACHE_AXES = ("layers", "act_batch",', 'CACHE_AXES = ("layers", None,',
      T_SHARD + "test_batch_cache_and_logits_layout"),
    # --- sharding rules
    M("vocab-not-sharded", "sharding rules", RULES, '"vocab": ("tensor",),', '"vocab": (),', LAYOUTS),
    M("kv-heads-not-sharded", "sharding rules", RULES, '"kv_heads": ("tensor",),', '"kv_heads": (),', LAYOUTS),
    M("embed-not-fsdp", "sharding rules", RULES, '"embed": ("fsdp", "context"),', '"embed": ("context",),', LAYOUTS),
    # --- context parallelism (sharding/context.py, attention's gathered K/V)
    M("context-causal-by-shard-index", "context parallelism", ATTN,
      "query_index = jnp.asarray(balanced_order(t, context_shards))", "query_index = jnp.arange(t)",
      T_CTX + "test_context_parallel_equals_one_device[data=4,context=2]"),
    M("context-kv-left-balanced", "context parallelism", ATTN,
      "k, v = (from_balanced(constrain(x, KV_GATHERED), context_shards) for x in (k, v))",
      "k, v = (constrain(x, KV_GATHERED) for x in (k, v))",
      T_CTX + "test_context_parallel_equals_one_device[data=4,context=2]"),
    M("context-splash-natural-query-order", "context parallelism", ATTN,
      "full.q_sequence = balanced_order(t, context_shards).astype(np.int32)", "pass",
      T_CTX + "test_attention_under_context_equals_numpy[splash]"),
    M("context-hidden-left-balanced", "context parallelism", MODEL,
      "x = constrain(from_balanced(x, shards), (", "x = constrain((x), (",
      T_CTX + "test_context_parallel_equals_one_device[fsdp=2,context=4]"),
    M("context-params-replicated", "sharding rules", RULES, '"embed": ("fsdp", "context"),', '"embed": ("fsdp",),',
      T_CTX + "test_context_splits_parameters_like_fsdp"),
    M("context-chunks-not-mirrored", "context parallelism", "sharding/context.py",
      "for j in (i, 2 * shards - 1 - i)]", "for j in (2 * i, 2 * i + 1)]",
      T_CTX + "test_balanced_order_gives_every_shard_the_same_causal_work"),
    M("batch-over-data-only", "sharding rules", RULES, '"act_batch": ("data", "fsdp"),', '"act_batch": ("data",),',
      T_SHARD + "test_batch_cache_and_logits_layout"),
    M("uneven-dims-split-anyway", "sharding rules", RULES, "while axes and size %", "while False and size %", LAYOUTS),
    # --- resume
    M("resume-from-oldest-checkpoint", "resume", "llama_jax/checkpoint/runs.py",
      "sorted(self.manager.all_steps(), reverse=True)", "sorted(self.manager.all_steps())",
      "tests/test_train_resume.py::test_kill9_sigterm_and_corrupt_checkpoint_resume_exactly"),
    M("init-from-ignored", "resume", "train/loop.py", "if run.init_from is not None:", "if False:", TRAIN_RUN),
    # --- tokenizer formats
    M("alpaca-template-extra-newline", "tokenizer formats", TOK, '{instruction}\\n\\n### Response:"\n)',
      '{instruction}\\n\\n### Response:\\n"\n)', T_TOK + "test_alpaca_no_input_exact"),
    M("chat-answer-without-trailing-space", "tokenizer formats", TOK, "{E_INST} {answer['content'].strip()} \"",
      "{E_INST} {answer['content'].strip()}\"", T_TOK + "test_encode_dialog_layout"),
    M("system-block-one-newline", "tokenizer formats", TOK, 'E_SYS = "<<SYS>>\\n", "\\n<</SYS>>\\n\\n"',
      'E_SYS = "<<SYS>>\\n", "\\n<</SYS>>\\n"', T_TOK + "test_encode_dialog_layout"),
    M("llama3-chat-content-not-stripped", "tokenizer formats", TOK, 'body = message["content"].strip() + L3_EOT',
      'body = message["content"] + L3_EOT', T_TOK + "test_llama3_dialog_equals_transformers_chat_template[system]"),
    M("hf-tokenizer-bos-from-eos", "tokenizer formats", TOK, 'self._special_id("bos", configs, name), self._special_id("eos"',
      'self._special_id("eos", configs, name), self._special_id("eos"',
      T_TOK + "test_hf_tokenizer_ids_equal_transformers[Hello world!]"),
    # --- generate CLI, evaluation, MFU
    M("cli-system-ignored", "generate CLI", CLI, '[{"role": "system", "content": args.system}] if', "[] if",
      T_GEN + "test_cli_alpaca_input_and_chat_system_prompts_equal_hf"),
    M("cli-dtype-ignored", "generate CLI", CLI, "mesh=mesh, dtype=args.dtype, quantize=", "mesh=mesh, dtype=None, quantize=",
      T_GEN + "test_cli_tensor_parallel_dtype_and_generator_mesh"),
    M("exact-match-without-strip", "evaluation", "train/evaluate.py", 'row["got"].strip() == row["expected"].strip()',
      'row["got"] == row["expected"]', T_RUN + "test_exact_match_scores_greedy_answers_after_strip"),
    M("chip-lookup-shortest-name", "MFU", "sharding/hardware.py", "max(matches, key=lambda m: m[0])",
      "min(matches, key=lambda m: m[0])", T_STEP + "test_chip_lookup_by_device_kind"),
    M("mfu-not-per-chip", "MFU", "llama_jax/flops.py", "/ (n_chips * peak_flops)", "/ peak_flops",
      T_STEP + "test_flops_per_token_formula"),
    # --- the docs (issue 24): a reference that skips flags, runnable blocks that are never run, guides left out
    M("docs-subcommand-flags-unchecked", "docs", "scripts/docs_pages.py",
      'parsers = [(name, parser)] + [(f"{name} {sub}", p) for sub, _, p in _subcommands(parser)]',
      "parsers = [(name, parser)]", "tests/test_docs.py::test_a_flag_without_help_is_reported[llama_jax.eval-perplexity]"),
    M("docs-python-blocks-not-runnable", "docs", "tests/test_docs.py", 'FENCE = re.compile(r"^```(bash|python)\\s*$")',
      'FENCE = re.compile(r"^```(bash)\\s*$")',
      "tests/test_docs.py::test_every_runnable_marker_sits_on_a_fence_and_the_guides_have_blocks"),
    M("docs-new-guide-left-out-of-nav", "docs", "scripts/docs_pages.py", "        if uri not in present:",
      "        if False:", "tests/test_docs.py::test_a_guide_the_nav_does_not_list_is_appended_to_the_guides"),
    # --- the offline tokenizer on hostile input (issue 22)
    M("cut-inside-whitespace-runs", "offline tokenizer", TOK, 'return re.compile(r"\\S(?=[" +',
      'return re.compile(r"(?<=.)(?=[" +', T_PRETOK + "test_long_documents_are_cut_where_the_ids_do_not_change"),
    M("rest-encoded-as-a-new-text", "offline tokenizer", TOK,
      "for ids in self.encode_batch([CUT_ANCHOR + t for t in texts], bos=False):",
      "for ids in self.encode_batch(list(texts), bos=False):",
      T_PRETOK + "test_long_documents_are_cut_where_the_ids_do_not_change",
      more=(("        anchor = self._anchor\n", "        anchor = []\n"),)),
    M("pieces-start-documents", "offline tokenizer", PRETOK,
      "starts = [not isinstance(raw, Piece) or raw.first for _, raw in chunk]", "starts = [True for _ in chunk]",
      T_PRETOK + "test_long_documents_are_cut_where_the_ids_do_not_change"),
    M("tokenize-without-lock", "offline tokenizer", PRETOK,
      'with locked_folder(output, LOCK, f"tokenized data set folder {output}"):',
      "with contextlib.nullcontext(os.makedirs(output, exist_ok=True)):",
      T_PRETOK + "test_two_runs_racing_into_one_folder_one_wins"),
    M("output-file-not-checked", "offline tokenizer", PRETOK,
      "if os.path.lexists(output) and not os.path.isdir(output):", "if False:",
      T_PRETOK + "test_output_that_is_a_file_or_holds_the_input_is_refused"),
    M("shard-tokens-no-upper-bound", "offline tokenizer", PRETOK,
      "or not 1024 <= shard_tokens <= MAX_SHARD_TOKENS:", "or not 1024 <= shard_tokens:",
      T_PRETOK + "test_numeric_flags_are_range_checked_before_anything_is_allocated"),
    M("hub-offline-not-caught", "offline tokenizer", "train/data/formats.py",
      "    except ConnectionError:  # what `datasets` raises offline",
      "    except datasets.exceptions.DatasetGenerationError:  # what `datasets` raises offline",
      T_PRETOK + "test_hub_data_set_offline_is_one_line"),
    M("jsonl-surrogates-unchecked", "offline tokenizer", "train/data/formats.py",
      '        _check_surrogates(value, where, "")', "        pass",
      T_PRETOK + "test_lone_surrogate_escape_names_file_line_and_field"),
    # --- the server under hostile load (issue 22)
    M("settings-not-clamped", "server isolation", BATCHER, "np.int32(min(int(request.top_k), self.cfg.vocab_size))",
      "np.int32(int(request.top_k))", ISOLATION + "[top_k 2**31]"),
    M("decode-failure-blames-the-newest", "server isolation", BATCHER, "self._fail(removed[-1],", "self._fail(removed[0],",
      ISOLATION + "[decode]"),
    M("replay-draws-with-step-0", "server isolation", BATCHER, "_step_keys(keys, done[None])",
      "_step_keys(keys, 0 * done[None])", ISOLATION + "[lost]"),
    M("body-read-whole", "server limits", APP, "if size > max_body_bytes:", "if False:",
      "tests/test_serve.py::test_body_limits_are_kept_while_reading"),
    M("parse-on-the-event-loop", "server limits", APP, "await run_in_threadpool(prepare, raw)", "prepare(raw)",
      "tests/test_serve.py::test_health_and_a_live_stream_go_on_while_big_prompts_arrive"),
    M("api-key-prefix-accepted", "server auth", APP, "hmac.compare_digest(token.encode(\"latin-1\"), key_bytes)",
      "token.encode(\"latin-1\").startswith(key_bytes)", "tests/test_serve.py::test_api_key"),
    M("json-nesting-a-500", "server limits", PROTOCOL,
      "    except RecursionError:\n        raise APIError(400, \"the request body's JSON nests too deeply to parse\") from None\n",
      "", BAD_REQUEST + "[32]", BAD_REQUEST + "[33]"),
    M("prompt-surrogate-reaches-the-tokenizer", "server limits", PROTOCOL, 'return len(text.encode("utf-8"))',
      'return len(text.encode("utf-8", "surrogatepass"))', BAD_REQUEST + "[30]", BAD_REQUEST + "[31]", SHORT_ERRORS),
    M("model-name-echoed-whole", "server limits", APP, 'f"the model {wire.short(name)} does not exist',
      'f"the model \\"{name}\\" does not exist', SHORT_ERRORS),
    M("disconnect-caught-as-connection-reset", "server limits", APP, "except ClientDisconnect:",
      "except ConnectionResetError:", SHORT_ERRORS),
    M("kv-cache-checked-on-devices-only", "server limits", BATCHER,
      'return int(meminfo["MemAvailable"].split()[0]) * 1024, "available host RAM (MemAvailable)"',
      'return None, "unknown"', "tests/test_serve.py::test_cli_serves_a_checkpoint_and_refuses_bad_flags"),
    # --- preference tuning (issue 23)
    M("dpo-ignores-reference", "preference", OBJ, "rewards = beta * (logp - reference)", "rewards = beta * logp",
      PREF_HF),
    M("simpo-not-length-normalised", "preference", OBJ, "rewards = beta * logp / safe", "rewards = beta * logp",
      PREF_HF),
    M("orpo-drops-its-sft-term", "preference", OBJ, "return -mean[:, 0] - beta * ratio, beta * mean",
      "return -beta * ratio, beta * mean", PREF_HF),
    M("padding-pairs-counted", "preference", OBJ, "valid = jnp.all(counts > 0, axis=-1).astype(jnp.float32)",
      "valid = jnp.ones(counts.shape[:1], jnp.float32)", PREF_HF),
    M("reward-margin-ignored", "preference", OBJ, "logp[:, 0] - logp[:, 1] - margin", "logp[:, 0] - logp[:, 1]",
      T_PREF + "test_reward_loss_and_accuracy_equal_torch"),
    M("reward-read-at-the-first-token", "preference", "llama_jax/reward.py", "(lengths - 1)[:, None, None]",
      "(lengths * 0)[:, None, None]", T_PREF + "test_reward_loss_and_accuracy_equal_torch"),
    M("chat-pair-trains-on-earlier-answers", "preference", PREF, "return ids, [0] * n_prompt + mask[n_prompt:]",
      "return ids, mask", T_PREF_DATA + "test_schemas_give_the_chat_and_alpaca_layouts"),
    M("long-pairs-lose-the-answer-end", "preference", PREF,
      "cut.append((ids[:1] + ids[1 + over:], mask[:1] + mask[1 + over:]))", "cut.append((ids[:-over], mask[:-over]))",
      T_PREF_DATA + "test_long_prompts_are_cut_first_and_long_answers_skipped"),
    M("reference-scored-again-on-resume", "preference", "train/loop.py",
      "scores = reference.load(cfg.output_dir, tables) if start else None", "scores = None",
      T_PREF + "test_dpo_run_resumes_exactly_after_kill9"),

]


def check_targets(root: str, mutations: list[Mutation]) -> list[str]:
    """Problems with the mutations' targets in `root` (each snippet must occur exactly once)."""
    problems = []
    for m in mutations:
        path = os.path.join(root, m.file)
        if not os.path.isfile(path):
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        text = open(path).read()
        for old, _ in m.edits:
            count = text.count(old)
            if count != 1:
                problems.append(f"{m.name}: {m.file} holds {old!r} {count} times (expected once)")
    return problems


def pytest(scratch: str, tests: tuple[str, ...] | list[str]) -> tuple[int, str, float]:
    """(exit code, last output lines, seconds) of `python -m pytest -x -q TESTS` in the scratch tree."""
    start = time.time()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S}s", time.time() - start
    return done.returncode, (done.stdout + done.stderr)[-3000:], time.time() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0].split("::", 1)[-1][:90]
    return output.strip().splitlines()[-1][:90] if output.strip() else ""


def apply(scratch: str, m: Mutation) -> str:
    """Write the mutated file into the scratch tree; return the original text."""
    path = os.path.join(scratch, m.file)
    original = open(path).read()
    text = original
    for old, new in m.edits:
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    py_compile.compile(path, doraise=True)  # a mutation must be valid Python, not caught by a SyntaxError
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only these mutations (names)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = parser.parse_args(argv)
    mutations = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            print(f"error: unknown mutation(s) {unknown}; see --list", file=sys.stderr)
            return 2
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:40s} {m.area:18s} {m.file}: {m.edits[0][0]!r}")
        print(f"{len(mutations)} mutations ({sum(m.from_issue for m in mutations)} from issue 19)")
        return 0
    problems = check_targets(ROOT, mutations)
    if problems:
        print("error: mutation targets moved (update tests/mutations/run.py):\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        scratch = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.egg-info", ".mypy_cache"))
        if not args.no_baseline:
            tests = sorted({t for m in mutations for t in m.tests})
            code, output, seconds = pytest(scratch, tests)
            print(f"baseline: {len(tests)} tests unmutated, exit {code}, {seconds:.0f}s", flush=True)
            if code != 0:
                print(f"error: the tests fail without any mutation:\n{output}", file=sys.stderr)
                return 2
        rows = []
        for i, m in enumerate(mutations, 1):
            original = apply(scratch, m)
            try:
                code, output, seconds = pytest(scratch, m.tests)
            finally:
                with open(os.path.join(scratch, m.file), "w") as f:
                    f.write(original)
            verdict = {1: "caught", 0: "SURVIVED", -1: "caught (timeout)"}.get(code, f"ERROR (pytest exit {code})")
            by = first_failure(output) if code != 0 else ", ".join(t.split("::")[-1] for t in m.tests)
            rows.append((m, verdict, seconds, by))
            print(f"[{i}/{len(mutations)}] {m.name}: {verdict} in {seconds:.0f}s ({by})", flush=True)

    caught = sum(v.startswith("caught") for _, v, _, _ in rows)
    print(f"\n| mutation | area | file | result | caught by | s |\n|---|---|---|---|---|---|")
    for m, verdict, seconds, by in rows:
        name = f"{m.name} (issue 19)" if m.from_issue else m.name
        print(f"| {name} | {m.area} | `{m.file}` | {verdict} | {by} | {seconds:.0f} |")
    print(f"\n{len(rows)} mutations in {(time.time() - started) / 60:.1f} minutes "
          f"({time.strftime('%Y-%m-%d %H:%M')}); each runs only the tests listed for it")
    print(f"{caught} caught, {len(rows) - caught} survived")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
