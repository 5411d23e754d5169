"""Evaluation protocols: which metrics a dataset is scored with, how, and how the paper prints them.

The columns are those of MGIE's Tables 1-2 (Fu et al., 2024, Sec. 4.1):

==================  ============================  ==============================================
protocol            columns                       source of the protocol
==================  ============================  ==============================================
evr                 L1, DINO, CVS                 MGIE Tables 1-2
gier                L1, SSIM, CVS                 MGIE Tables 1-2
ma5k                L1, SSIM, LPIPS               MGIE Tables 1-2
magicbrush          L1, DINO, CVS, CTS            MGIE Tables 1-2 (CTS on global captions)
magicbrush-paper    L1, DINO, CVS, CTS            MagicBrush paper (CLIP-T on local captions)
ipr2pr              CLIP_direction, CLIP_image    InstructPix2Pix's CFG sweep (Brooks et al.)
advancededit        VIEScore, CTS, PSNR, SSIM,    InsightEdit's AdvancedEdit-Eval table
                    LPIPS                         (see :data:`ADVANCEDEDIT_NOTES`)
emu-edit            CLIP_direction, CVS, CTS,     Emu Edit test set, against the INPUT
                    L1, DINO                      (``reference: source``; no targets)
gedit-*, imgedit    L1 (against the input)        judge-scored afterwards (``judge``);
                                                  docs/benchmarks.md
reason-edit-*       PSNR_bg, SSIM_bg, LPIPS_bg,   SmartEdit's Reason-Edit by its release's
                    MSE_bg, CLIPScore_box         rule (background vs the input, CLIP of the
                                                  mask's box); VIEScore judged afterwards
                                                  (InsightEdit's table;
                                                  :data:`REASON_EDIT_NOTES`)
synthetic           L1, L1_edit, SSIM             exact ground truth, backbone-free
==================  ============================  ==============================================

Scaling (:data:`PAPER_SCALE`): MGIE prints DINO, CVS and SSIM as percentages and CTS as
``100 * cos``; L1 and LPIPS raw; ``advancededit`` has its own (:data:`ADVANCEDEDIT_SCALE`).
Raw values stay in ``test_metrics.json``'s ``metrics``; the scaled ones form its ``table``.
FID, KID and VIEScore are added on demand (``model.init_args.extra_metrics``).

``advancededit`` lists VIEScore, which asks an MLLM judge: ``test`` scores the other columns and
writes the result bundle, and VIEScore is judged afterwards from the bundle's images (``python
-m editbench judge --bundle DIR``, :mod:`metrics.judge.offline`; no GPU waits on HTTP, one judge
pass serves every aggregation); the report sets the judged columns beside the others. The
in-process :class:`~metrics.judge.metric.VIEScore` (``metric_kwargs.VIEScore``: an
OpenAI-compatible endpoint and key, or a local LLaVA folder) serves evaluation during training.
Its published rows: :data:`metrics.published.INSIGHTEDIT_TABLES`.

Backbones (:attr:`Protocol.backbones`, folder names under ``$EDITBENCH_BACKBONES``): MagicBrush's
``evaluation/image_eval.py`` uses CLIP ViT-B/32 (CLIP-I, CLIP-T) and ``dino_vits16``; MGIE
reuses MagicBrush's metrics for every dataset. InstructPix2Pix's ``metrics/clip_similarity.py``
uses CLIP ViT-L/14. A user's ``backbones`` override these; each metric's provenance records the
folder (and its weights' hash) it used.

CTS caption source (:attr:`Protocol.caption_source`): MGIE speaks of CTS as "global caption
alignment" (Sec. 4.2), which is also the default of MagicBrush's script (``--caption_path``
defaults to ``global_description.json``); the MagicBrush paper used the local (per-turn)
descriptions. The data module's ``caption_source`` decides which captions a sample carries, so
:meth:`Protocol.for_data` refuses data whose captions are not the protocol's.

MagicBrush turn settings (its ``evaluation/README.md`` and ``image_eval.py``), for either test
mode of the data (:data:`MAGICBRUSH_SETTINGS`):

- *single-turn* (the script's ``all_turn``): every independently generated turn (``<id>_1``,
  ``<id>_inde_<k>``, all 1,053 test turns) = aggregation ``all`` of an ``independent`` run;
- *multi-turn* (the script's ``final_turn``): the last turn of each session generated
  iteratively (``<id>_iter_<n>``, or ``<id>_1`` for a one-turn session) = aggregation ``final``
  of an ``iterative`` run.

Every run reports the aggregations ``all``, ``final`` and ``turn1`` (turn 1 alone, which is
neither setting); the table takes the one the data's ``test_mode`` makes a MagicBrush setting
(:meth:`Protocol.for_data`) unless a user's ``aggregation`` overrides it. MGIE does not say
which setting its MagicBrush columns use and MagicBrush's READMEs name neither as the main one;
the suite's default is single-turn (``all``, the default ``independent`` test mode), the
setting that scores every test turn, and the results record the setting by MagicBrush's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

#: Multiplier from a metric's raw value to the number MGIE prints (absent = 1).
PAPER_SCALE: dict[str, float] = {"DINO": 100.0, "CVS": 100.0, "SSIM": 100.0, "CTS": 100.0}

#: InsightEdit's AdvancedEdit-Eval table (main comparison): VIEScore on 0-1 (VIEScore's 0-10
#: divided by 10), CLIPScore as ``100 * cos`` (torchmetrics' CLIPScore), PSNR in dB, SSIM and
#: LPIPS raw. Keys name the flattened VIEScore results (``VIEScore_failures`` stays a count).
ADVANCEDEDIT_SCALE: dict[str, float] = {
    "VIEScore_SC": 0.1,
    "VIEScore_PQ": 0.1,
    "VIEScore_O": 0.1,
    "CTS": 100.0,
}

#: CLIP and LPIPS as SmartEdit's released ``test/metrics_evaluation.py`` (the evaluation
#: InsightEdit builds on; InsightEdit released none): torchmetrics ``CLIPScore`` on
#: ``openai/clip-vit-large-patch14``, ``LearnedPerceptualImagePatchSimilarity(net_type=
#: 'squeeze')``.
ADVANCEDEDIT_BACKBONES = {"clip": "clip-vit-large-patch14"}
ADVANCEDEDIT_METRIC_KWARGS: dict[str, dict[str, Any]] = {"LPIPS": {"net": "squeeze"}}

#: How the ``advancededit`` columns map to the InsightEdit paper's (Xu et al., CVPR 2025,
#: "Main Results (Comparison on AdvancedEdit-Eval)"), and what the paper leaves open.
ADVANCEDEDIT_NOTES = (
    "Columns VIEScore, CLIPScore, PSNR, SSIM, LPIPS of InsightEdit's AdvancedEdit-Eval table. "
    "VIEScore = the suite's VIEScore_O (VIEScore's overall sqrt(SC*PQ)), printed 0-1 in the "
    "main table (x 0.1) and 0-10 in the IAA ablation; the paper does not say which subscore "
    "or judge (its data filter used GPT-4o with VIEScore's SC/PQ prompts). CLIPScore = CTS "
    "(CLIP image-text cosine of the edit and its target caption, x 100 as torchmetrics' "
    "CLIPScore, without its clamp at 0) on CLIP ViT-L/14: the paper names no backbone or "
    "text; values near 20 fit ViT-L/14 image-caption cosines, and SmartEdit's script uses "
    "ViT-L/14 (on the edit cropped to the mask's box, against a target-object text). PSNR, "
    "SSIM, LPIPS: edit against the ground-truth target on the whole image, mean over images; "
    "SmartEdit's script instead compares source and edit on the unedited (masked-out) region "
    "at 256 px, which the paper's text neither confirms nor rules out."
)

#: Aggregations of multi-turn data (MagicBrush): which samples each one scores.
AGGREGATIONS = ("all", "final", "turn1")

#: Former aggregation names, with what replaced them (an error names the new one).
RENAMED_AGGREGATIONS = {
    "single": "'single' was turn 1 only, which is neither MagicBrush setting: it is now "
    "'turn1'; MagicBrush's single-turn setting is 'all' of an independent run"
}

#: What a protocol's image metrics compare the edit with (:attr:`Protocol.reference`): the
#: ground-truth ``target``, or the ``source`` for benchmarks that release no target (Emu Edit's
#: test set scores L1, DINO and CLIP-I of the edit against its input; the judge-scored GEdit and
#: ImgEdit have none either). A ``source`` protocol has no copy-the-input baseline (it would
#: score the input against itself).
REFERENCES = ("target", "source")

#: Metrics that read the batch's captions (their source must be the protocol's).
CAPTION_METRICS = ("CTS", "CLIP_direction")

#: Backbone folder names (under ``$EDITBENCH_BACKBONES``) of MagicBrush's evaluation script.
MAGICBRUSH_BACKBONES = {"clip": "clip-vit-base-patch32", "dino": "dino-vits16"}
#: InstructPix2Pix's CLIP (``metrics/clip_similarity.py``: ``ClipSimilarity(name="ViT-L/14")``).
INSTRUCTPIX2PIX_BACKBONES = {"clip": "clip-vit-large-patch14"}


@dataclass(frozen=True)
class TurnSetting:
    """A MagicBrush evaluation setting: its name, the script's name, the aggregation that
    gives it and the test mode it needs."""

    name: str
    script_name: str
    aggregation: str
    test_mode: str


#: test_mode -> the MagicBrush setting that mode's run reports.
MAGICBRUSH_SETTINGS = {
    "independent": TurnSetting("single-turn", "all_turn", "all", "independent"),
    "iterative": TurnSetting("multi-turn", "final_turn", "final", "iterative"),
}


def _check_aggregation(protocol: str, aggregation: str, known: tuple[str, ...]) -> None:
    if aggregation in RENAMED_AGGREGATIONS:
        raise ValueError(
            f"protocol {protocol!r}: aggregation {aggregation!r} was renamed: "
            f"{RENAMED_AGGREGATIONS[aggregation]}"
        )
    if aggregation not in known:
        raise ValueError(
            f"protocol {protocol!r}: unknown aggregation {aggregation!r}; known: {known}"
        )


@dataclass(frozen=True)
class Protocol:
    """A dataset's evaluation protocol.

    Attributes:
        name: the protocol's name (a DataModule's ``protocol`` attribute).
        columns: metric names of the paper's table, in its order.
        aggregations: ``("all",)`` for single-turn data; MagicBrush adds ``final`` and
            ``turn1``.
        default_aggregation: the aggregation that fills ``test/<metric>`` and the table.
        source: where the protocol comes from (printed in the report's footnotes).
        scale: table multipliers per metric.
        backbones: default backbone folder names by kind (``clip``, ``dino``), under
            ``$EDITBENCH_BACKBONES``.
        metric_kwargs: default constructor arguments per metric (a user's win key by key).
        caption_source: the captions CTS is measured against (``"global"``/``"local"``), None
            where the protocol does not say.
        turn_settings: test_mode -> the MagicBrush setting (:data:`MAGICBRUSH_SETTINGS`).
        reference: what ``target``-taking metrics compare the edit with: ``"target"`` (the
            ground truth) or ``"source"`` (benchmarks without targets, :data:`REFERENCES`).
        judge: the judge prompt set ``python -m editbench judge --bundle DIR`` scores this
            protocol's bundles with (None: no judge step).
    """

    name: str
    columns: tuple[str, ...]
    aggregations: tuple[str, ...] = ("all",)
    default_aggregation: str = "all"
    source: str = ""
    scale: dict[str, float] = field(default_factory=lambda: dict(PAPER_SCALE))
    backbones: dict[str, str] = field(default_factory=lambda: dict(MAGICBRUSH_BACKBONES))
    metric_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    caption_source: str | None = None
    turn_settings: dict[str, TurnSetting] = field(default_factory=dict)
    reference: str = "target"
    judge: str | None = None

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(
                f"protocol {self.name!r}: reference must be one of {REFERENCES}, got "
                f"{self.reference!r}"
            )
        for aggregation in self.aggregations:
            _check_aggregation(self.name, aggregation, AGGREGATIONS)
        _check_aggregation(self.name, self.default_aggregation, self.aggregations)
        if self.caption_source not in (None, "local", "global"):
            raise ValueError(
                f"protocol {self.name!r}: caption_source must be 'local', 'global' or None, got "
                f"{self.caption_source!r}"
            )

    def scale_of(self, name: str) -> float:
        """The table multiplier of a result name: its own entry (``VIEScore_O`` in
        :data:`ADVANCEDEDIT_SCALE`), else flattened names (``KID_std``, ``L1_edit``,
        ``VIEScore_SC``) take their metric's."""
        if name in self.scale:
            return self.scale[name]
        return self.scale.get(name.split("_")[0], 1.0)

    def with_aggregation(self, aggregation: str) -> Protocol:
        """The same protocol with another default aggregation (``all``, ``final``,
        ``turn1``); ``single`` (the former turn-1 aggregation) is an error naming its new
        name."""
        _check_aggregation(self.name, aggregation, self.aggregations)
        return dataclasses.replace(self, default_aggregation=aggregation)

    def setting(self, aggregation: str | None, test_mode: str | None) -> TurnSetting | None:
        """The MagicBrush setting that ``aggregation`` of a ``test_mode`` run is, if any."""
        setting = self.turn_settings.get(test_mode) if test_mode else None
        aggregation = aggregation or self.default_aggregation
        return setting if setting is not None and setting.aggregation == aggregation else None

    def for_data(self, datamodule: Any) -> Protocol:
        """This protocol for the data ``datamodule`` serves.

        - Turn setting: where the data has a ``test_mode`` that makes one of the protocol's
          aggregations a MagicBrush setting (independent -> single-turn = ``all``; iterative ->
          multi-turn = ``final``), that aggregation becomes the default. Apply a user's
          ``aggregation`` after this (:meth:`with_aggregation`).
        - Captions: where the protocol names a ``caption_source`` and scores captions (CTS), the
          data's ``caption_source`` must be the same, else a ``ValueError`` names both.
        """
        protocol = self
        test_mode = getattr(datamodule, "test_mode", None)
        setting = self.turn_settings.get(test_mode) if isinstance(test_mode, str) else None
        if setting is not None and setting.aggregation in self.aggregations:
            protocol = dataclasses.replace(self, default_aggregation=setting.aggregation)
        self.check_captions(getattr(datamodule, "caption_source", None), type(datamodule).__name__)
        return protocol

    def check_captions(self, data_source: str | None, data_name: str = "the data") -> None:
        """Raise when the protocol scores captions from another source than ``data_source``."""
        if self.caption_source is None or data_source is None:
            return
        if not any(c in CAPTION_METRICS for c in self.columns):
            return
        if data_source != self.caption_source:
            other = [p.name for p in PROTOCOLS.values() if p.caption_source == data_source]
            hint = f" or use the protocol {other[0]!r}" if other else ""
            raise ValueError(
                f"protocol {self.name!r} scores captions (CTS) against {self.caption_source} ones, but "
                f"{data_name} has caption_source={data_source!r}: set the data's "
                f"caption_source to {self.caption_source!r}{hint} (model.init_args.protocol)"
            )

    def settings_for(self, test_mode: str | None) -> dict[str, str]:
        """``{aggregation: MagicBrush setting name}`` of a ``test_mode`` run (e.g.
        ``{"all": "single-turn"}`` for an independent run; empty where none applies)."""
        setting = self.turn_settings.get(test_mode) if test_mode else None
        return {setting.aggregation: setting.name} if setting is not None else {}


_MAGICBRUSH = dict(
    columns=("L1", "DINO", "CVS", "CTS"),
    aggregations=AGGREGATIONS,
    default_aggregation="all",
    turn_settings=dict(MAGICBRUSH_SETTINGS),
)

#: Emu Edit's columns (Sheynin et al., CVPR 2024, Sec. 5: CLIPdir, CLIPimg, CLIPout, L1, DINO),
#: all of the edit against the test set's INPUT image and captions (the set has no targets):
#: CLIP_direction (input -> edit vs input_caption -> output_caption), CVS (CLIP-I edit vs
#: input), CTS (edit vs output_caption), L1 and DINO (edit vs input). Raw values (the paper's
#: scale and backbones were not verified here: its table text was not found; see
#: docs/benchmarks.md); backbones default to MagicBrush's, whose images the set reuses.
EMU_EDIT_COLUMNS = ("CLIP_direction", "CVS", "CTS", "L1", "DINO")

#: GEdit-Bench languages/subsets (Step1X-Edit, Liu et al. 2025, Table 2: EN, CN; full set of
#: 606 per language, intersection subset of 434) -> protocol name.
GEDIT_PROTOCOLS = {
    (language, subset): f"gedit-{language}" + ("-intersection" if subset == "intersection" else "")
    for language in ("en", "cn")
    for subset in ("full", "intersection")
}
GEDIT_PROTOCOLS.update({("all", "full"): "gedit", ("all", "intersection"): "gedit-intersection"})

_JUDGED = (
    "; judge-scored afterwards (python -m editbench judge --bundle DIR); in test only L1 of "
    "the edit against its input (how much changed, not a benchmark score)"
)

#: Reason-Edit's scenarios (SmartEdit, Huang et al., CVPR 2024; datamodules/reason_edit.py) ->
#: protocol name: the dataset names of InsightEdit's Reason-Edit comparison.
REASON_EDIT_PROTOCOLS = {
    "understanding": "reason-edit-understanding",
    "reasoning": "reason-edit-reasoning",
}
#: SmartEdit's released test/metrics_evaluation.py, as metrics/masked_release.py computes it, in
#: the order of SmartEdit's Reason-Edit table (PSNR, SSIM, LPIPS, CLIP Score; the script also
#: prints MSE).
REASON_EDIT_COLUMNS = ("PSNR_bg", "SSIM_bg", "LPIPS_bg", "MSE_bg", "CLIPScore_box")
#: LPIPS on SqueezeNet as the release (LPIPS_bg's default too; LPIPS for a user's whole-image one).
REASON_EDIT_METRIC_KWARGS: dict[str, dict[str, Any]] = {
    "LPIPS": {"net": "squeeze"},
    "LPIPS_bg": {"net": "squeeze"},
}
#: What SmartEdit's released evaluation computes on Reason-Edit, and how the suite follows it.
REASON_EDIT_NOTES = (
    "Columns PSNR_bg, SSIM_bg, LPIPS_bg, MSE_bg, CLIPScore_box: SmartEdit's released "
    "test/metrics_evaluation.py (TencentARC/SmartEdit a65f126), per image then the mean over "
    "images (metrics/masked_release.py). The release reads input and edit PNGs with PIL "
    "(convert('RGB')) and the *_mask.jpg with convert('L'), resizes input and edit to 256x256 "
    "with Image.resize(BICUBIC) (an edit already 256 px stays as it is) and the mask with "
    "NEAREST, weighs both images on [0,1] by the background w = 1 - mask/255 (soft: JPEG edge "
    "and noise levels give weights between 0 and 1) and compares input and edit on the whole "
    "256x256 frame (masked-out pixels are 0 in both): torchmetrics PeakSignalNoiseRatio and "
    "StructuralSimilarityIndexMeasure (data_range 1, SSIM defaults), MeanSquaredError, and "
    "LearnedPerceptualImagePatchSimilarity(net_type='squeeze') (normalize False) on 2w x - 1. "
    "Its CLIP score is torchmetrics CLIPScore (openai/clip-vit-large-patch14, max(100 cos, 0), "
    "0-100) of the 256 px edit cropped with PIL's crop((left, top, right, bottom)) to the box of "
    "the resized mask's NONZERO pixels (grey level >= 1; PIL's box excludes the last row and "
    "column) against the line's 'CLIP: ' text (goal_caption). The suite reads the input and "
    "mask the same way into the samples (datamodules/reason_edit.py, metrics_size 256: "
    "source_native, mask_grey_native) and resizes the model's 8-bit edit straight to 256 with "
    "PIL bicubic; the mask is the grey one, not the suite's >= 128 binary mask: with JPEG masks "
    "the two differ at the edges (weights off by up to a few levels/255) and, more, in the "
    "crop box, which JPEG ringing of low nonzero levels widens by up to the 8x8 blocks around "
    "the mask's border. No copy baseline (reference: source). As released, the script's folder "
    "walk never scores 6-Reasoning (it collects folders ending in 'Reasoning-231115' and scores "
    "those ending in '6-Reasoning'), and it prints the understanding totals as the mean over "
    "all images of the five folders. InsightEdit's Reason-Edit comparison reports VIEScore "
    "only (0-1): judged afterwards (python -m editbench judge --bundle DIR), VIEScore_O x 0.1 "
    "as that table prints it."
)

BENCHMARK_PROTOCOLS = (
    Protocol(
        "emu-edit",
        EMU_EDIT_COLUMNS,
        source="Emu Edit test set (facebook/emu_edit_test_set; Sheynin et al., CVPR 2024): "
        "CLIPdir, CLIPimg, CLIPout, L1, DINO against the input image and captions (no targets)",
        scale={},
        reference="source",
    ),
    *(
        Protocol(
            name,
            ("L1",),
            source=f"GEdit-Bench (Step1X-Edit, 2025), {language} {subset} set: VIEScore SC, PQ, "
            f"O (0-10) by GPT-4.1 (Table 2)" + _JUDGED,
            scale={},
            reference="source",
            judge="gedit",
        )
        for (language, subset), name in GEDIT_PROTOCOLS.items()
    ),
    Protocol(
        "imgedit",
        ("L1",),
        source="ImgEdit-Bench basic single-turn suite (Ye et al., 2025; Benchmark/Basic): 1-5 "
        "judge scores per edit type, averaged per image then per type" + _JUDGED,
        scale={},
        reference="source",
        judge="imgedit",
    ),
    *(
        Protocol(
            name,
            REASON_EDIT_COLUMNS,
            source=f"SmartEdit's Reason-Edit ({scenarios} scenarios) by its release's "
            "test/metrics_evaluation.py: background-masked PSNR/SSIM/LPIPS/MSE against the "
            "input and CLIPScore of the mask's box at 256 px; VIEScore judged afterwards "
            "(InsightEdit's Reason-Edit table); metrics.protocols.REASON_EDIT_NOTES",
            scale=dict(ADVANCEDEDIT_SCALE),
            backbones=dict(ADVANCEDEDIT_BACKBONES),
            metric_kwargs={k: dict(v) for k, v in REASON_EDIT_METRIC_KWARGS.items()},
            reference="source",
            judge="viescore",
        )
        for scenarios, name in REASON_EDIT_PROTOCOLS.items()
    ),
)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("evr", ("L1", "DINO", "CVS"), source="MGIE Tables 1-2"),
        Protocol("gier", ("L1", "SSIM", "CVS"), source="MGIE Tables 1-2"),
        Protocol("ma5k", ("L1", "SSIM", "LPIPS"), source="MGIE Tables 1-2"),
        Protocol(
            "magicbrush",
            source="MGIE Tables 1-2 (CTS: 'global caption alignment'); turn settings of "
            "MagicBrush's evaluation/README.md",
            caption_source="global",
            **_MAGICBRUSH,
        ),
        Protocol(
            "magicbrush-paper",
            source="MagicBrush paper (Zhang et al., 2023): CLIP-T on the local descriptions; "
            "turn settings of its evaluation/README.md",
            caption_source="local",
            **_MAGICBRUSH,
        ),
        Protocol(
            "ipr2pr",
            ("CLIP_direction", "CLIP_image"),
            source="InstructPix2Pix's metrics/clip_similarity.py (CLIP ViT-L/14)",
            backbones=dict(INSTRUCTPIX2PIX_BACKBONES),
        ),
        Protocol(
            "advancededit",
            ("VIEScore", "CTS", "PSNR", "SSIM", "LPIPS"),
            source="InsightEdit (Xu et al., CVPR 2025), AdvancedEdit-Eval table; columns as "
            "metrics.protocols.ADVANCEDEDIT_NOTES says",
            scale=dict(ADVANCEDEDIT_SCALE),
            backbones=dict(ADVANCEDEDIT_BACKBONES),
            metric_kwargs={k: dict(v) for k, v in ADVANCEDEDIT_METRIC_KWARGS.items()},
            judge="viescore",
        ),
        *BENCHMARK_PROTOCOLS,
        Protocol("synthetic", ("L1", "L1_edit", "SSIM"), source="editbench synthetic data"),
        Protocol("generic", ("L1", "SSIM"), source="editbench default"),
        Protocol("concat", ("L1", "SSIM"), source="editbench default"),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is an error listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(
            f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}"
        ) from None


def aggregation_indices(aggregation: str, batch: dict) -> torch.Tensor | None:
    """Indices of the batch's samples an aggregation scores (None = all of them).

    ``turn1`` keeps turn 1, ``final`` the last turn of each session (``turn == num_turns``);
    both need the batch's ``turn`` and ``num_turns`` (MagicBrush samples carry them).
    """
    if aggregation == "all":
        return None
    _check_aggregation("?", aggregation, AGGREGATIONS)
    missing = [k for k in ("turn", "num_turns") if k not in batch]
    if missing:
        raise ValueError(
            f"the {aggregation!r} turn aggregation needs the batch keys {missing}, which this "
            f"dataset does not provide (multi-turn data such as MagicBrush does)"
        )
    turn = torch.as_tensor(batch["turn"]).reshape(-1)
    if aggregation == "turn1":
        keep = turn == 1
    else:
        keep = turn == torch.as_tensor(batch["num_turns"]).reshape(-1)
    return keep.nonzero().reshape(-1)
