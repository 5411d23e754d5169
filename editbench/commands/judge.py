"""``python -m editbench judge --bundle DIR``: a result bundle judged offline after ``test``
(:mod:`metrics.judge.offline`), by VIEScore or by ImgEdit-Bench's judge.

The scheme is the one the run's protocol names (``judge: imgedit`` for ImgEdit-Bench, VIEScore
for the others), or ``--scheme``. The judge is an OpenAI-compatible endpoint (``--base_url``,
``--model``, the API key from the environment variable named by ``--api_key_env``; there is no
flag or config entry for the key itself) or a local LLaVA folder (``--local PATH``).
``--prompts_path``: VIEScore: the release's ``prompts_raw`` folder (default: the built-in
prompts, not comparable with published numbers); ImgEdit: the release's ``prompts.json``
(required; not shipped). ``--preset viescore-release`` / ``imgedit-release`` take the release's
judge settings.

VIEScore settings not given as flags default to those the run was configured with
(``model.init_args.metric_kwargs.VIEScore``, which ``test`` records in ``test_metrics.json`` as
``protocol.judge_settings``; it names the API key's variable, never the key).

Writes ``judge.jsonl``, the judged rows of ``samples.jsonl`` and ``judge_metrics.json`` into the
bundle and rehashes its manifest; ``--only-failed`` asks again only the failed judgements. The
exit status is 1 when failures remain (their count is printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from metrics.bundle import RESULTS, BundleError
from metrics.judge.cache import DEFAULT_CACHE_DIR, AnswerCache
from metrics.judge.imgedit import IMGEDIT_PRESETS, ImgEditPrompts, load_imgedit_prompts
from metrics.judge.judges import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    LocalJudge,
    OpenAIJudge,
    build_judge,
)
from metrics.judge.metric import DEFAULTS
from metrics.judge.offline import judge_bundle
from metrics.judge.prompts import JUDGE_PRESETS, PromptSet, apply_preset, prompt_set

SCHEMES = ("viescore", "imgedit")
#: preset -> the scheme it is the release's judge of.
PRESETS = {**JUDGE_PRESETS, **IMGEDIT_PRESETS}
PRESET_SCHEMES = {**dict.fromkeys(JUDGE_PRESETS, "viescore"), **dict.fromkeys(IMGEDIT_PRESETS, "imgedit")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editbench judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = parser.add_argument
    add("--bundle", required=True, help="a test run's log dir holding its result bundle")
    add("--only-failed", "--only_failed", dest="only_failed", action="store_true",
        help="ask again only the judgements recorded as failed (and samples without a record)")  # fmt: skip
    add("--base_url", default=None,
        help=f"OpenAI-compatible endpoint root (default: ${BASE_URL_ENV}, else {DEFAULT_BASE_URL})")  # fmt: skip
    add("--model", default=DEFAULTS["model"], help="model name sent to the endpoint")
    add("--api_key_env", default="OPENAI_API_KEY",
        help="NAME of the environment variable holding the API key (never the key itself)")  # fmt: skip
    add("--local", default=None, metavar="PATH", help="judge with a local LLaVA folder instead")
    add("--scheme", choices=SCHEMES, default=None,
        help="viescore or imgedit (default: the judge the run's protocol names)")  # fmt: skip
    add("--prompts_path", default=None, help="VIEScore: the release's prompts_raw folder; "
        "ImgEdit: the release's Benchmark/Basic/prompts.json (or its folder)")  # fmt: skip
    add("--preset", default=None, choices=sorted(PRESETS), help="published judge settings")
    add("--temperature", type=float, default=DEFAULTS["temperature"])
    add("--max_tokens", type=int, default=DEFAULTS["max_new_tokens"])
    add("--image_size", type=int, default=DEFAULTS["image_size"],
        help="longer side the images are shrunk to (0: native size)")  # fmt: skip
    add("--image_format", choices=("png", "jpeg"), default=DEFAULTS["image_format"])
    add("--seed", type=int, default=None, help="sent as the request's seed")
    add("--timeout", type=float, default=60.0, help="seconds per request")
    add("--max_retries", type=int, default=3, help="the client's retries of a failed request")
    add("--retry_delay", type=float, default=1.0, help="first delay before re-asking an answer "
        "that did not parse")  # fmt: skip
    add("--num_threads", type=int, default=4, help="concurrent requests")
    add("--cache_dir", default=DEFAULT_CACHE_DIR, help="answer cache folder")
    add("--no_cache", action="store_true", help="neither read nor write the answer cache")
    add("--device", default="cpu", help="local judge: torch device")
    add("--dtype", default="float32", help="local judge: torch dtype")
    return parser


def make_judge(args: argparse.Namespace) -> OpenAIJudge | LocalJudge:
    given = {
        "backend": "local" if args.local else "openai",
        "model": args.model,
        "max_new_tokens": args.max_tokens,
        "temperature": args.temperature,
        "image_size": args.image_size or None,
        "image_format": args.image_format,
    }
    settings = apply_preset(args.preset, given, DEFAULTS, PRESETS)
    judge = build_judge(
        settings["backend"],
        model=settings["model"],
        base_url=args.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
        api_key_env=args.api_key_env,
        model_path=args.local,
        timeout=args.timeout,
        max_retries=args.max_retries,
        temperature=settings["temperature"],
        max_new_tokens=settings["max_new_tokens"],
        image_size=settings["image_size"],
        image_format=settings["image_format"],
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    judge.check_key()
    return judge


#: judge flag -> the VIEScore argument (``model.init_args.metric_kwargs.VIEScore`` of the run,
#: recorded as ``protocol.judge_settings.VIEScore``) it defaults to when not given.
CONFIG_FLAGS = {
    "model": "model",
    "base_url": "base_url",
    "api_key_env": "api_key_env",
    "local": "model_path",
    "prompts_path": "prompts_path",
    "preset": "preset",
    "temperature": "temperature",
    "max_tokens": "max_new_tokens",
    "image_size": "image_size",
    "image_format": "image_format",
    "timeout": "timeout",
    "max_retries": "max_retries",
    "retry_delay": "retry_delay",
    "num_threads": "num_threads",
    "cache_dir": "cache_dir",
    "dtype": "judge_dtype",
}


def _protocol(folder: str | Path) -> dict:
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise BundleError(f"{path} is missing: not a test run's result bundle")
    return json.loads(path.read_text()).get("protocol") or {}


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line."""
    return {
        action.dest
        for action in parser._actions
        for option in action.option_strings
        if any(arg == option or arg.startswith(option + "=") for arg in argv)
    }


def apply_run_settings(args: argparse.Namespace, given: set[str], protocol: dict) -> dict:
    """Fill the flags not given from the VIEScore settings the run was configured with
    (``protocol.judge_settings.VIEScore`` of its ``test_metrics.json``); returns those used."""
    settings = (protocol.get("judge_settings") or {}).get("VIEScore") or {}
    used = {}
    for flag, key in CONFIG_FLAGS.items():
        if flag in given or key not in settings:
            continue
        value = settings[key]
        if flag == "local" and settings.get("backend", "openai") != "local":
            continue
        setattr(args, flag, 0 if flag == "image_size" and value is None else value)
        used[flag] = value
    if settings.get("use_cache") is False and "no_cache" not in given:
        args.no_cache = used["no_cache"] = True
    return used


def bundle_scheme(protocol: dict) -> str:
    """The scheme the run's protocol names (``judge: imgedit`` -> imgedit, else viescore)."""
    from metrics.protocols import get_protocol

    name = protocol.get("name")
    try:
        judge = get_protocol(str(name)).judge
    except ValueError:
        judge = None
    return "imgedit" if judge == "imgedit" else "viescore"


def load_prompts(args: argparse.Namespace, scheme: str) -> PromptSet | ImgEditPrompts:
    """The prompts of ``scheme``; a preset of the other scheme is an error naming both."""
    if args.preset is not None and PRESET_SCHEMES[args.preset] != scheme:
        raise ValueError(
            f"--preset {args.preset} is {PRESET_SCHEMES[args.preset]}'s judge, but this bundle "
            f"is judged by {scheme}"
        )
    if scheme == "imgedit":
        if args.prompts_path is None:
            raise ValueError(
                "the ImgEdit judge needs --prompts_path: the release's Benchmark/Basic/prompts.json "
                "(PKU-YuanGroup/ImgEdit); its prompts are not shipped with the suite"
            )
        return load_imgedit_prompts(args.prompts_path)
    return prompt_set(args.prompts_path)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # The run's protocol (test_metrics.json) names the scheme and the configured judge;
        # ImgEdit's judge has no configured settings to read.
        protocol = {} if args.scheme == "imgedit" else _protocol(args.bundle)
        scheme = args.scheme or bundle_scheme(protocol)
        if scheme == "viescore":
            used = apply_run_settings(args, given_flags(parser, argv), protocol)
            if used:
                shown = ", ".join(f"{k} {v!r}" for k, v in used.items())
                print(f"judge settings from the run's config (metric_kwargs.VIEScore): {shown}")
        prompts = load_prompts(args, scheme)
        judge = make_judge(args)
        cache = None if args.no_cache else AnswerCache(args.cache_dir)
        result = judge_bundle(
            args.bundle,
            judge,
            prompts,
            only_failed=args.only_failed,
            cache=cache,
            num_threads=args.num_threads,
            retry_delay=args.retry_delay,
        )
    except (BundleError, FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"editbench judge: error: {err}", file=sys.stderr)
        return 2
    summary = result.summary
    print(
        f"{result.scheme.name} of {result.folder}: {summary['n_judged']} of "
        f"{summary['n_samples']} samples judged ({result.asked} prompts asked this pass) by "
        f"{judge.backend}:{judge.model_id}; {result.scheme.headline(summary)}; failure rate "
        f"{'–' if summary['failure_rate'] is None else format(summary['failure_rate'], '.4g')}"
    )
    if result.failures:
        failed = [s for s in result.scores if s.failed]
        for score in failed[:10]:
            print(f"  failed {score.id}: {score.reason}", file=sys.stderr)
        print(
            f"editbench judge: {result.failures} sample(s) failed (missing from the means, "
            "not scored 0); rerun with --only-failed to ask only those again",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
