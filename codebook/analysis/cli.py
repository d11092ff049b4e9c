"""Analysis subcommands of ``python -m codebook``: index, code, search, topics, generate and
steer-eval.

``add_analysis_parsers(subparsers)`` registers them all. Heavy imports happen inside the handlers
so that ``--help`` stays fast. Every query prints text, or JSON with ``--json``.

* ``index``: run a model over text files and store its code activation index;
* ``code``: a code's frequency, top activating contexts and promoted tokens;
* ``search``: codes ranked by precision and recall on a regex (or token) over the index;
* ``topics``: codes that concentrate in documents about a topic; ``--save`` makes a preset;
* ``generate``: unsteered and steered continuations of a prompt, same seed;
* ``steer-eval``: the paper's steering evaluation for a topic;
* ``presets``: topic search, calibration and steering evaluation for several topics, saved as the
  model's presets (this is how the default model's ``topics.json`` is made).

What they write (the index, presets) goes beside a model of one's own, and for a Hub model or the
default model to one's data directory, never into the Hugging Face cache or the package
(:mod:`codebook.analysis.userdata`); ``--output`` says where instead. Readers look there first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codebook.steering_spec import MODES, POSITIONS
from codebook.text import FORMATS

# Steering from a topic search when a topic has no preset: how many of the best codes to force,
# at most how many per head, from which layers, and how. The median of the settings that
# `presets`' calibration chose for the paper's seven topics on the default model (16 codes at
# strength 1.5 for five topics; 8 and 16 codes at strength 2 for the others; all from its one
# codebook layer); a preset carries its own calibrated setting.
TOPIC_MAX_CODES = 16
TOPIC_PER_HEAD = 4
TOPIC_STRENGTH = 1.5
TOPIC_MODE = "add"
TOPIC_LAST_LAYERS = "1"  # codes of the last codebook layer only ("all": every layer)


def add_analysis_parsers(subparsers) -> None:
    _add_index(subparsers)
    _add_word_topics(subparsers)
    _add_code(subparsers)
    _add_search(subparsers)
    _add_topics(subparsers)
    _add_generate(subparsers)
    _add_steer_eval(subparsers)
    _add_presets(subparsers)


# -- shared options and helpers ---------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (embedded), a model directory or a Hub repo id")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON")


def _data_options(parser: argparse.ArgumentParser, required: bool, what: str) -> None:
    parser.add_argument("--data", nargs="+", metavar="FILE", required=required, help=what)
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="how documents are separated in the files (default: auto)")
    parser.add_argument("--batch-size", type=int, default=16, help="documents per forward call")
    parser.add_argument("--max-length", type=int,
                        help="tokens per document read (default: the model's context)")


def _steering_options(parser: argparse.ArgumentParser, codes: bool = True) -> None:
    if codes:
        parser.add_argument("--codes", metavar="SPEC",
                            help="codes to force, LAYER:SITE:HEAD:CODE comma-separated (or JSON)")
    parser.add_argument("--strength", type=float, help="scale of the forced codes")
    parser.add_argument("--mode", choices=MODES, help="steering mode")
    parser.add_argument("--positions", choices=POSITIONS,
                        help="tokens to steer (default: the preset's, else all)")
    parser.add_argument("--max-codes", type=int, default=TOPIC_MAX_CODES,
                        help="codes taken from topic search when the topic has no preset")
    parser.add_argument("--per-head", type=int, default=TOPIC_PER_HEAD,
                        help="at most this many topic-search codes per head")
    parser.add_argument("--last-layers", default=TOPIC_LAST_LAYERS, metavar="N|all",
                        help="take topic-search codes from the last N codebook layers only "
                        f"(default: {TOPIC_LAST_LAYERS})")
    _search_options(parser)


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--statistic", choices=["context", "lead-in", "document"],
                        default="context", help="how topic search ranks codes (see "
                        "codebook/analysis/search.py; default: context precision)")


def _load(args):
    """``(model, model directory)``, after applying ``--threads``."""
    import torch

    from codebook import CodebookModel, hub

    if args.threads:
        torch.set_num_threads(args.threads)
    directory = hub.resolve_model_dir(args.model)
    model = CodebookModel.from_pretrained(directory)
    if model.tokenizer is None:
        raise ValueError(f"the model {args.model} has no tokenizer files: analysis needs one")
    return model, directory


def _index_of(args, directory):
    from codebook.analysis.index import INDEX_NAME, CodeIndex
    from codebook.analysis.userdata import analysis_file

    return CodeIndex.load(args.index or analysis_file(directory, INDEX_NAME))


def _output_option(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--output", metavar="PATH",
                        help=f"{name} to write, or an existing directory to hold it (default: "
                        "beside the "
                        "model; for a Hub model or the default model, your data directory, "
                        "see codebook/analysis/userdata.py)")


def _output(args, directory, name: str) -> Path:
    """Where a command writes its file ``name``: ``--output`` (a file, or a directory to hold
    it), else the model's analysis directory; never into the Hugging Face cache."""
    from codebook.analysis.userdata import analysis_dir, check_outside_hub_cache

    if args.output:
        path = Path(args.output).expanduser()
        if path.is_dir():
            path = path / name
    else:
        path = analysis_dir(directory) / name
    return check_outside_hub_cache(path)


def _save_presets(args, directory, new: dict) -> Path:
    """Add the ``new`` presets to the ``topics.json`` the command writes, keeping the others it
    holds (or, when there is none yet, the model's)."""
    from codebook.analysis.topics import TOPICS_NAME, load_topics, save_topics

    path = _output(args, directory, TOPICS_NAME)
    presets = load_topics(path if path.is_file() else directory)
    presets.update(new)
    return save_topics(path, presets)


def _print(args, result: dict, text: str) -> None:
    print(json.dumps(result, indent=1) if args.json else text)


def _topic_results(args, model, directory, patterns: dict[str, str]) -> dict:
    """Topic search for ``patterns`` (name → regex) over ``--data`` if given, else from the
    model's word statistics (context precision; ``word_topics.safetensors``), else over the
    model's index."""
    from codebook.analysis.index import Layout, corpus_documents
    from codebook.analysis.search import topic_search
    from codebook.analysis.userdata import analysis_file
    from codebook.analysis.word_topics import WORD_TOPICS_NAME, WordTopics
    from codebook.text import read_documents, token_surfaces

    layout = Layout.of_model(model)
    # Enough ranked codes for the selection to skip codes of heads that are already full.
    top = max(getattr(args, "top", 0), 10 * getattr(args, "max_codes", 0), 500)
    word_topics = analysis_file(directory, WORD_TOPICS_NAME)
    if (not args.data and not getattr(args, "index", None) and args.statistic == "context"
            and word_topics.is_file()):
        stats = WordTopics.load(word_topics)
        stats.layout.check_model(model, "the word topic statistics")
        return {name: stats.result(pattern, top) for name, pattern in patterns.items()}
    if args.data:
        documents = corpus_documents(model, read_documents(args.data, args.format),
                                     args.batch_size, args.max_length, args.progress)
    else:
        index = _index_of(args, directory)
        index.layout.check_model(model)
        documents = index.documents()
    return topic_search(documents, layout, token_surfaces(model.tokenizer), patterns,
                        args.statistic, top=top)


def _topic_regex(topic: str, regex: str | None, presets: dict) -> str:
    """The regex of a topic: the one given, else its preset's, else the paper's, else the word."""
    from codebook.analysis.topics import PAPER_TOPICS

    if regex:
        return regex
    if topic in presets:
        return presets[topic]["regex"]
    return PAPER_TOPICS.get(topic, topic)


def _topic_steering(args, model, found):
    """The steering a topic search result gives: its best codes of the last ``--last-layers``
    codebook layers, within the per-head limit."""
    from codebook.analysis.index import Layout
    from codebook.analysis.search import last_layers, select_codes
    from codebook.steering import Steering

    layout = Layout.of_model(model)
    layers = last_layers(layout, _last_layers(args.last_layers))
    ranked = [score for score in found.codes if score.ref.layer in layers]
    if not ranked:
        raise ValueError(f"topic search found no code in layers {layers} (--last-layers "
                         f"{args.last_layers})")
    codes = select_codes(ranked, layout, args.max_codes, args.per_head)
    return Steering(codes, strength=args.strength or TOPIC_STRENGTH,
                    mode=args.mode or TOPIC_MODE, positions=args.positions or "all")


def _resolve_steering(args, model, directory):
    """``(steering, regex, source)`` for generate / steer-eval: ``--codes``, else the topic's
    preset, else a topic search."""
    from codebook.analysis.topics import load_topics, preset_steering
    from codebook.steering import Steering

    presets = load_topics(directory)
    regex = _topic_regex(args.topic, args.regex, presets) if args.topic else args.regex
    if args.codes:
        steering = Steering(args.codes, strength=args.strength or 1.0,
                            mode=args.mode or "add", positions=args.positions or "all")
        return steering, regex, "given"
    if not args.topic:
        raise ValueError("say what to steer with: --codes SPEC or a topic")
    if args.topic in presets and not args.data:
        steering = preset_steering(presets[args.topic], strength=args.strength, mode=args.mode,
                                   positions=args.positions)
        return steering, regex, "preset"
    found = _topic_results(args, model, directory, {args.topic: regex})[args.topic]
    return _topic_steering(args, model, found), regex, "topic-search"


# -- index ------------------------------------------------------------------------------------


def _add_index(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="build a code activation index of text files",
        description="Run a codebook model over documents and store every token's codes, each "
        "document's token offsets and each code's count (safetensors), beside the model (for a "
        "Hub model or the default model, in your data directory) unless --output says otherwise.")
    _common(parser, json_output=False)
    _data_options(parser, required=True, what="text files or folders of .txt files to index")
    _output_option(parser, "the index file")
    parser.add_argument("--max-tokens", type=int,
                        help="keep the index small: only the first documents that fit this many "
                        "tokens")
    parser.add_argument("--topic-stories", type=int, default=0, metavar="N",
                        help="put N stories about each of the model's topic presets first, so "
                        "that a small index still covers them")
    parser.set_defaults(func=_run_index)


def _run_index(args) -> None:
    from codebook.analysis.index import INDEX_NAME, build_index, topic_stories_first
    from codebook.analysis.topics import load_topics
    from codebook.text import read_documents

    model, directory = _load(args)
    output = _output(args, directory, INDEX_NAME)
    documents = read_documents(args.data, args.format)
    meta = {"model": str(args.model), "sources": [str(p) for p in args.data]}
    if args.topic_stories:
        presets = load_topics(directory)
        if not presets:
            raise ValueError(f"--topic-stories needs topic presets, and {args.model} has none")
        documents, taken = topic_stories_first(
            documents, {name: p["regex"] for name, p in presets.items()}, args.topic_stories)
        meta["topic_stories_first"] = taken
    index = build_index(model, documents, args.batch_size, args.max_length, args.max_tokens,
                        args.progress, meta)
    path = index.save(output)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.2f} MiB): {index.num_documents} of {len(documents)} documents, "
          f"{index.num_tokens} tokens, {len(index.layout.sites)} sites"
          + (f", {index.meta['truncated_documents']} documents cut to "
             f"{index.meta['max_length']} tokens" if index.meta["truncated_documents"] else ""))


def _add_word_topics(subparsers) -> None:
    parser = subparsers.add_parser(
        "word-topics", help="per-word topic statistics, for topic search without --data",
        description="Run a codebook model over documents (its training text) and keep, for "
        "every word of at least --min-documents of them, its --top codes by context precision "
        "(codebook/analysis/word_topics.py). Topic search then needs no --data for those words. "
        "Written "
        "beside the model (a Hub or the default model: your data directory) unless --output "
        "says otherwise.")
    _common(parser, json_output=False)
    _data_options(parser, required=True, what="the model's training text")
    _output_option(parser, "the statistics file")
    parser.add_argument("--min-documents", type=int, default=20,
                        help="keep words found in at least this many documents")
    parser.add_argument("--top", type=int, default=128, help="codes kept per word")
    parser.set_defaults(func=_run_word_topics)


def _run_word_topics(args) -> None:
    from codebook.analysis.word_topics import WORD_TOPICS_NAME, WordTopics
    from codebook.text import read_documents

    model, directory = _load(args)
    output = _output(args, directory, WORD_TOPICS_NAME)
    documents = read_documents(args.data, args.format)
    stats = WordTopics.build(model, documents, args.min_documents, args.top,
                             batch_size=args.batch_size, max_length=args.max_length,
                             progress=args.progress,
                             meta={"model": str(args.model),
                                   "sources": [str(p) for p in args.data]})
    path = stats.save(output)
    print(f"wrote {path.name} ({path.stat().st_size / 2**20:.2f} MiB): {len(stats.words):,} "
          f"words of at least {args.min_documents} of {stats.num_documents:,} documents")


# -- code -------------------------------------------------------------------------------------


def _add_code(subparsers) -> None:
    parser = subparsers.add_parser(
        "code", help="a code's frequency, top activating contexts and promoted tokens",
        description="What a code does: how often it fires in the index, the contexts it fires "
        "in (hit marked [[like this]]) and the tokens its vector promotes.")
    _common(parser)
    parser.add_argument("code", metavar="CODE",
                        help="LAYER:SITE:HEAD:CODE, e.g. 3:attn_heads:2:117")
    parser.add_argument("--index", help="index file (default: the model's)")
    parser.add_argument("--contexts", type=int, default=10, help="contexts to show")
    parser.add_argument("--window", type=int, default=8, help="tokens each side of a hit")
    parser.add_argument("--promote", type=int, default=10, help="promoted tokens to show")
    parser.set_defaults(func=_run_code)


def _run_code(args) -> None:
    from codebook.analysis.contexts import code_summary
    from codebook.analysis.promote import promoted_tokens
    from codebook.steering import CodeRef
    from codebook.text import token_surfaces

    model, directory = _load(args)
    ref = CodeRef.parse(args.code)
    index = _index_of(args, directory)
    index.layout.check_model(model)
    surfaces = token_surfaces(model.tokenizer)
    result = code_summary(index, ref, surfaces, args.contexts, args.window)
    result["promoted_tokens"] = promoted_tokens(model, ref, args.promote, surfaces)
    lines = [f"code {ref}: fired on {result['count']} of {result['indexed_tokens']} tokens "
             f"({100 * result['frequency']:.3f}%), in {result['documents']} of "
             f"{result['indexed_documents']} documents",
             "promotes: " + ", ".join(f"{t['token']!r} ({t['logit']:+.2f})"
                                      for t in result["promoted_tokens"]),
             "top contexts:"]
    lines += [f"  [rank {c['rank']}] {c['text']!r}" for c in result["contexts"]]
    _print(args, result, "\n".join(lines))


# -- search -----------------------------------------------------------------------------------


def _add_search(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="codes ranked by precision and recall on a regex or token",
        description="Code search over the index: target tokens are those overlapping the "
        "regex's first capture group (or the whole match), or the given token; codes are ranked "
        "by F1 of precision (share of a code's activations on targets) and recall (share of "
        "targets the code fires on).")
    _common(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--regex", help="regular expression (case-insensitive)")
    what.add_argument("--token", help="a token, as the tokenizer spells it (e.g. ' dragon')")
    parser.add_argument("--group", help="capture group selecting the target (number or name)")
    parser.add_argument("--tokens", choices=["all", "first", "last"], default="all",
                        help="which tokens of a multi-token match are targets")
    parser.add_argument("--case-sensitive", action="store_true")
    parser.add_argument("--index", help="index file (default: the model's)")
    parser.add_argument("--top", type=int, default=20, help="codes to list")
    parser.set_defaults(func=_run_search)


def _run_search(args) -> None:
    from codebook.analysis.search import code_search, regex_targets, token_targets
    from codebook.text import token_surfaces

    model, directory = _load(args)
    index = _index_of(args, directory)
    index.layout.check_model(model)
    surfaces = token_surfaces(model.tokenizer)
    if args.regex:
        targets = regex_targets(index, surfaces, args.regex, args.group, args.tokens,
                                ignore_case=not args.case_sensitive)
    else:
        ids = [i for i, s in enumerate(surfaces) if s == args.token]
        if not ids:
            raise ValueError(f"no token of the vocabulary is spelled {args.token!r}")
        targets = token_targets(index, ids)
    scores = code_search(index, targets, args.top)
    result = {"pattern": args.regex or args.token, "targets": int(targets.sum()),
              "codes": [s.to_dict() for s in scores]}
    lines = [f"{result['targets']} target tokens; codes by F1:",
             f"  {'code':24} {'precision':>9} {'recall':>7} {'F1':>6} {'hits':>6} {'count':>7}"]
    lines += [f"  {str(s.ref):24} {s.precision:9.3f} {s.recall:7.3f} {s.score:6.3f} {s.hits:6} "
              f"{s.count:7}" for s in scores]
    _print(args, result, "\n".join(lines))


# -- topics -----------------------------------------------------------------------------------


def _add_topics(subparsers) -> None:
    parser = subparsers.add_parser(
        "topics", help="codes that concentrate in documents about a topic",
        description="Topic search: documents matching the topic's regex are the topic's. Codes "
        "are ranked by the share of their activations that fall after the topic's first mention "
        "(--statistic context, the default), by how much more often they fire just before a "
        "mention than elsewhere (--statistic lead-in) or by document-level precision and recall "
        "(--statistic document). Several topics share one pass over the corpus. Without --topic, "
        "lists the model's presets.")
    _common(parser)
    parser.add_argument("--topic", nargs="+", metavar="TOPIC",
                        help="topic name(s); a name is also its regex unless --regex is given")
    parser.add_argument("--regex", help="regex marking the topic's documents (one topic only)")
    _data_options(parser, required=False,
                  what="text files to search (default: the model's index)")
    parser.add_argument("--index", help="index file (default: the model's)")
    parser.add_argument("--top", type=int, default=20, help="codes to list")
    _steering_options(parser, codes=False)
    parser.add_argument("--save", action="store_true",
                        help="store the selected codes as each topic's preset in topics.json")
    _output_option(parser, "topics.json")
    parser.set_defaults(func=_run_topics)


def _run_topics(args) -> None:
    from codebook import hub
    from codebook.analysis.topics import load_topics, make_preset

    if not args.topic:
        presets = load_topics(hub.resolve_model_dir(args.model))
        lines = [f"{name}: /{p['regex']}/ {len(p['codes'])} codes, strength {p.get('strength')}, "
                 f"mode {p.get('mode')}" for name, p in presets.items()]
        _print(args, presets, "\n".join(lines) or "this model has no topic presets")
        return
    if args.regex and len(args.topic) > 1:
        raise ValueError("--regex applies to one topic; give each topic its own run")
    model, directory = _load(args)
    presets = load_topics(directory)
    patterns = {topic: _topic_regex(topic, args.regex, presets) for topic in args.topic}
    found_all = _topic_results(args, model, directory, patterns)
    results, lines, new = {}, [], {}
    for topic, found in found_all.items():
        steering = _topic_steering(args, model, found)
        result = {**found.to_dict(), "codes": [c.to_dict() for c in found.codes[:args.top]],
                  "selected": [str(c) for c in steering.codes], "steering": steering.to_dict()}
        if args.save:
            chosen = set(steering.codes)
            search = {**found.to_dict(),
                      "codes": [c.to_dict() for c in found.codes if c.ref in chosen],
                      "corpus": [str(p) for p in args.data] if args.data else "index"}
            new[topic] = make_preset(patterns[topic], steering, {"search": search})
        results[topic] = result
        score = {"lead-in": "enrichment", "document": "F1"}.get(found.statistic, "precision")
        lines += [f"topic {topic!r} /{patterns[topic]}/: {found.topic_documents} of "
                  f"{found.documents} documents, {found.context_tokens} tokens after a first "
                  f"mention, {found.lead_ins} lead-in tokens; codes by "
                  f"{found.statistic} {score} (chance precision {found.chance:.2g}):",
                  f"  {'code':24} {'precision':>9} {'recall':>7} {score:>10} {'hits':>7} "
                  f"{'count':>7}"]
        lines += [f"  {str(s.ref):24} {s.precision:9.4f} {s.recall:7.3f} {s.score:10.4f} "
                  f"{s.hits:7} {s.count:7}" for s in found.codes[:args.top]]
        lines.append("selected for steering: " + ", ".join(result["selected"]))
    if args.save:
        path = _save_presets(args, directory, new)
        lines.append(f"saved preset(s) {', '.join(args.topic)} to {path}")
    _print(args, results, "\n".join(lines))


# -- generate ---------------------------------------------------------------------------------


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="unsteered and steered continuations of a prompt",
        description="Sample a continuation without and with steering, from the same seed. Steer "
        "with a topic (its preset, or codes found by topic search when it has none) or codes.")
    _common(parser)
    parser.add_argument("--prompt", default="", help="the prompt (default: empty)")
    parser.add_argument("--steer", dest="topic", metavar="TOPIC", help="topic to steer toward")
    parser.add_argument("--regex", help="the topic's regex, for a topic without a preset")
    _steering_options(parser)
    _data_options(parser, required=False,
                  what="text files for topic search (default: the model's index)")
    parser.add_argument("--index", help="index file for topic search (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.set_defaults(func=_run_generate)


def _run_generate(args) -> None:
    from codebook.analysis.steer_eval import continuation_text, sample
    from codebook.text import encode_document

    model, directory = _load(args)
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    steering, _, source = _resolve_steering(args, model, directory)
    prompt_ids = encode_document(model.tokenizer, args.prompt)
    outputs = {}
    for name, run in (("unsteered", None), ("steered", steering)):
        ids = sample(model, prompt_ids, 1, args.max_new_tokens, args.temperature, args.seed, run)
        outputs[name] = continuation_text(model.tokenizer, prompt_ids, ids[0])
    result = {"prompt": args.prompt, "seed": args.seed, "codes_source": source,
              "steering": steering.to_dict(), **outputs}
    codes = ", ".join(str(c) for c in steering.codes)
    text = (f"prompt: {args.prompt!r}\n\n--- unsteered ---\n{args.prompt}{outputs['unsteered']}"
            f"\n\n--- steered ({source}: {codes}; strength {steering.strength}, "
            f"{steering.mode}) ---\n{args.prompt}{outputs['steered']}")
    _print(args, result, text)


# -- steer-eval -------------------------------------------------------------------------------


def _add_steer_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "steer-eval", help="the paper's steering evaluation for a topic",
        description="Prompts '', 'Once upon a time,', 'Once there was a', 'A long time ago,'; "
        "samples per prompt with and without steering (pure sampling, same seeds); success = the "
        "regex appears in the continuation. Reports both rates, fluency (mean per-token loss of "
        "steered vs unsteered text, steering off) and distinct-2.")
    _common(parser)
    parser.add_argument("--topic", help="topic: its preset, else codes from topic search")
    parser.add_argument("--regex", help="success regex (default: the preset's or the topic word)")
    _steering_options(parser)
    _data_options(parser, required=False,
                  what="text files for topic search (default: the preset, else the index)")
    parser.add_argument("--index", help="index file for topic search (default: the model's)")
    parser.add_argument("--samples-per-prompt", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-samples", action="store_true", help="include the samples")
    parser.add_argument("--save", action="store_true",
                        help="record the result in the topic preset's stats (topics.json)")
    _output_option(parser, "topics.json")
    parser.set_defaults(func=_run_steer_eval)


def _run_steer_eval(args) -> None:
    from codebook.analysis.steer_eval import steer_eval
    from codebook.analysis.topics import load_topics, make_preset

    model, directory = _load(args)
    steering, regex, source = _resolve_steering(args, model, directory)
    if regex is None:
        raise ValueError("say what counts as success: --topic WORD or --regex R")
    result = steer_eval(model, steering, regex, samples_per_prompt=args.samples_per_prompt,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        seed=args.seed, progress=args.progress, keep_samples=args.show_samples)
    result = {"topic": args.topic, "codes_source": source, **result}
    if args.save:
        if not args.topic:
            raise ValueError("--save needs --topic: the preset to record the result in")
        presets = load_topics(directory)
        stats = dict(presets.get(args.topic, {}).get("stats", {}))
        # The preset holds the steering itself; the stats keep what was measured with it.
        stats["steer_eval"] = {k: v for k, v in result.items() if k not in ("topic", "steering")}
        preset = make_preset(regex, steering, stats)
        result["saved"] = str(_save_presets(args, directory, {args.topic: preset}))
    base, steered = result["baseline"], result["steered"]
    fluency = result["fluency_ratio"]
    lines = [
        f"topic {args.topic!r} /{regex}/, codes ({source}): "
        + ", ".join(str(c) for c in steering.codes),
        f"  strength {steering.strength}, mode {steering.mode}, positions {steering.positions}, "
        f"{args.samples_per_prompt} samples x {len(result['prompts'])} prompts, "
        f"{args.max_new_tokens} new tokens, seed {args.seed}",
        f"  {'':9} {'rate':>6} {'loss':>7} {'distinct-2':>10} {'length':>7}",
    ]
    for name, run in (("baseline", base), ("steered", steered)):
        loss = f"{run['loss']:.3f}" if run["loss"] is not None else "-"
        diversity = f"{run['distinct_2']:.3f}" if run["distinct_2"] is not None else "-"
        lines.append(f"  {name:9} {100 * run['rate']:5.1f}% {loss:>7} {diversity:>10} "
                     f"{run['mean_length']:7.1f}")
    lines.append("  fluency ratio (steered / baseline loss): "
                 + (f"{fluency:.3f}" if fluency is not None else "-"))
    if args.save:
        lines.append(f"saved to {result['saved']}")
    _print(args, result, "\n".join(lines))


# -- presets ----------------------------------------------------------------------------------


def _add_presets(subparsers) -> None:
    parser = subparsers.add_parser(
        "presets", help="find, calibrate and evaluate topic presets; save them in topics.json",
        description="For each topic: topic search over --data (one pass for all topics), then "
        "calibration (codebook/analysis/calibrate.py: every set of layers x number of codes x "
        "strength "
        "x mode of the grid is "
        "sampled on --calibration-seed; the highest steered rate whose fluency ratio stays "
        "within --max-fluency wins), then the paper's steering evaluation of the chosen setting "
        "on --seed, a different seed. Each topic's preset, with all three records in its stats, "
        "is saved in the model's topics.json (other presets are kept; see --output).")
    _common(parser)
    parser.add_argument("--topic", nargs="+", metavar="TOPIC",
                        help="topics (default: the paper's seven); the regex is the preset's, "
                        "the paper's or the word")
    _data_options(parser, required=False, what="text files for topic search (default: the "
                  "model's word topic statistics, else its index)")
    _search_options(parser)
    # Defaults (None) are codebook/analysis/calibrate.py's; importing it here would slow --help.
    parser.add_argument("--num-codes", type=int, nargs="+",
                        help="numbers of codes to try (default: 6 12 24)")
    parser.add_argument("--strengths", type=float, nargs="+",
                        help="strengths to try (default: 1.5 2 2.5 3 4)")
    parser.add_argument("--last-layers", nargs="+", metavar="N|all",
                        help="steer only codes of the model's last N codebook layers; values "
                        "to try (default: 1 2 all)")
    parser.add_argument("--per-head", type=int, help="at most this many codes per head (4)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="steering modes to try (default: add replace)")
    parser.add_argument("--max-fluency", type=float, help="largest steered/unsteered loss "
                        "ratio a calibrated setting may have (default: 1.25)")
    parser.add_argument("--min-distinct", type=float, help="smallest steered distinct-2 a "
                        "calibrated setting may have, as a fraction of the unsteered (default: "
                        "0.9)")
    parser.add_argument("--finalists", type=int, help="settings with the best rates that "
                        "sample again on the seed after --calibration-seed; the best over both "
                        "rounds wins (default: 3; 0: one round)")
    parser.add_argument("--calibration-seed", type=int, help="seed for calibration (default: 1; "
                        "the finalists' second round uses the next seed)")
    parser.add_argument("--calibration-samples", type=int, default=5,
                        help="samples per prompt for each calibration setting")
    parser.add_argument("--samples-per-prompt", type=int, default=10,
                        help="samples per prompt for the final evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the final evaluation")
    parser.add_argument("--dry-run", action="store_true", help="measure but do not save")
    _output_option(parser, "topics.json")
    parser.add_argument("--plot", metavar="PNG", help="also plot the rates and the calibration "
                        "of the topics measured")
    parser.set_defaults(func=_run_presets)


def _last_layers(value) -> int | None:
    if value is None or value == "all":
        return None
    try:
        last = int(value)
    except ValueError:
        raise ValueError(f"--last-layers takes positive numbers or 'all', got {value!r}") from None
    if last < 1:
        raise ValueError(f"--last-layers takes positive numbers or 'all', got {last}")
    return last


def _maybe(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _run_presets(args) -> None:
    from codebook.analysis import calibrate as grid
    from codebook.analysis.calibrate import calibrate
    from codebook.analysis.steer_eval import steer_eval
    from codebook.analysis.topics import PAPER_TOPICS, load_topics, make_preset, plot_presets

    for name, default in (("num_codes", list(grid.NUM_CODES)), ("strengths", list(grid.STRENGTHS)),
                          ("per_head", grid.PER_HEAD), ("max_fluency", grid.MAX_FLUENCY),
                          ("min_distinct", grid.MIN_DISTINCT), ("finalists", grid.FINALISTS),
                          ("calibration_seed", grid.CALIBRATION_SEED),
                          ("last_layers", list(grid.LAST_LAYERS)), ("modes", list(grid.MODES))):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.last_layers = [_last_layers(value) for value in args.last_layers]
    if args.seed in (args.calibration_seed, args.calibration_seed + 1):
        raise ValueError(f"--seed {args.seed} is a calibration seed (--calibration-seed "
                         f"{args.calibration_seed} and, for the finalists, the next): evaluate "
                         "on a seed the calibration did not choose with")
    model, directory = _load(args)
    presets = load_topics(directory)
    topics = args.topic or list(PAPER_TOPICS)
    patterns = {topic: _topic_regex(topic, None, presets) for topic in topics}
    found_all = _topic_results(args, model, directory, patterns)
    results, lines = {}, []
    for topic, found in found_all.items():
        calibration = calibrate(
            model, found.codes, patterns[topic], num_codes=args.num_codes,
            strengths=args.strengths, last_layers=args.last_layers, per_head=args.per_head,
            modes=args.modes, max_fluency=args.max_fluency, min_distinct=args.min_distinct,
            finalists=args.finalists, samples_per_prompt=args.calibration_samples,
            max_new_tokens=args.max_new_tokens, seed=args.calibration_seed,
            progress=args.progress)
        steering = calibration.steering
        evaluation = steer_eval(model, steering, patterns[topic],
                                samples_per_prompt=args.samples_per_prompt,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                progress=args.progress)
        chosen = set(steering.codes)
        search = {**found.to_dict(), "codes": [c.to_dict() for c in found.codes if c.ref in chosen],
                  "corpus": [str(p) for p in args.data or []]}
        stats = {"search": search, "calibration": calibration.to_dict(),
                 "steer_eval": {k: v for k, v in evaluation.items() if k != "steering"}}
        results[topic] = make_preset(patterns[topic], steering, stats)
        base, steered = evaluation["baseline"], evaluation["steered"]
        layers = sorted({c.layer for c in steering.codes})
        lines.append(f"{topic:10} /{patterns[topic]}/ {len(steering.codes):3} codes in layers "
                     f"{','.join(map(str, layers))} x {steering.strength:g} ({steering.mode}): "
                     f"{100 * base['rate']:5.1f}% -> {100 * steered['rate']:5.1f}%, fluency "
                     + _maybe(evaluation["fluency_ratio"])
                     + f", distinct-2 {_maybe(base['distinct_2'])} -> "
                     f"{_maybe(steered['distinct_2'])}")
    rates = [r["stats"]["steer_eval"]["steered"]["rate"] for r in results.values()]
    baselines = [r["stats"]["steer_eval"]["baseline"]["rate"] for r in results.values()]
    lines.append(f"mean: {100 * sum(baselines) / len(baselines):.1f}% -> "
                 f"{100 * sum(rates) / len(rates):.1f}% (seed {args.seed}, "
                 f"{args.samples_per_prompt} samples per prompt)")
    if not args.dry_run:
        lines.append(f"saved to {_save_presets(args, directory, results)}")
    if args.plot:
        lines.append(f"plotted to {plot_presets(results, args.plot)}")
    _print(args, results, "\n".join(lines))
