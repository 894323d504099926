"""The bad-input table: every entry script answers bad input with exit code != 0 and ONE clear line naming the bad
value and the fix, before any long work starts, without touching earlier runs' outputs.

One row per case; `tests/test_bad_input.py` turns each row into a test. A new entry script adds itself to
`SCRIPTS` and appends its rows to `CASES` (or extends `CASES` from its own module) -- nothing else to write.

Row fields
- id: unique test id, `<script>-<what is wrong>`.
- script: a key of SCRIPTS.
- overrides: Hydra overrides. Placeholders: `{art}` = a folder of prepared bad/good files (see ARTIFACTS below),
  `{tmp}` = the test's own tmp dir. Paths (checkpoints/cache/data) point at an EMPTY zoo unless `zoo=True`, so a
  case that reached zoo training would be caught (nothing may be trained before the error).
- expect: substrings that must all appear in the one-line message (bad value + fix / closest valid names).
- kind: "user" (our UserError -> `error: ...`, exit 2) or "hydra" (composition error printed by Hydra, exit != 0;
  the message must name the key and the value).
- subprocess: also run it as a real `python main_<script>.py ...` (slow: ~8-10 s of imports; keep these few).
  Rows that only fail through Hydra's machinery (e.g. an unwritable run dir, caught by a Hydra callback) have
  `inprocess=False`.
- requires: modules the row needs (importorskip); `ffcv` also writes the FFCV artifacts below (a real beton).
- copy / locked: permission rows. `copy=(src, dst)` copies a file or folder first (a `dst` without `src` is made
  an empty folder); `locked` is the path then made unreadable / unwritable: `os.open` is patched to raise
  PermissionError for it (so the row also runs as root, which permissions do not stop), and where the tests do
  not run as root `test_locked_rows_with_real_permissions` repeats the row with a real `chmod 000`.
- trains: the error comes from training itself (a diverging loss), so the run has logged: the earlier run's
  metrics.jsonl may gain this run's lines after its own, which stay byte for byte; every other output is untouched.

ARTIFACTS (written once per session by the `artifacts` fixture in test_bad_input.py):
  teacher10/            a valid 10-class mlp checkpoint folder (model.safetensors + meta.json)
  teacher5/             the same for a 5-class mlp (another label space)
  corrupt/              teacher10 with a truncated model.safetensors
  badmeta/              teacher10 with a corrupt meta.json
  mlp5.safetensors      a 5-class mlp's weights (Normalized state dict)
  resnet8.safetensors   a 10-class resnet8's weights
  trunc.safetensors     a truncated safetensors file
  evil.pt               a pickle that would run `touch {art}/PWNED` when unpickled
  emptyfolder/          an ImageFolder root whose class folders hold no images
  afile                 a regular file (a run dir below it cannot be created)
  metalist/ metanoarch/ teacher10 whose meta.json is a JSON list / lacks `arch`
  metadir/              teacher10 whose meta.json is a folder
  hashlie/              teacher10 whose meta.json claims teacher5's hash
  swapped/              teacher10's meta.json over another model's weights (replaced by hand)
  basis_{rank,shape,nan,garbage}.safetensors   KDEP bases: V 1-D / V (5, 3) for 64-d mu / NaN / random bytes
  nan.csv, bom.csv      models CSVs: a top1 of `nan`; a UTF-8 BOM before the header (and an unknown model first)
FFCV artifacts (rows with requires=("ffcv",); the `ffcv_artifacts` fixture):
  ffcv_empty/           digits_{train,val,test}.beton of zero bytes (an interrupted copy)
  ffcv_trunc/           the same names, each a real digits beton cut inside its allocation table (FFCV's Reader
                        accepts it and would read the missing images from beyond the end of the file)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Script:
    main: str  # the entry script
    config: str  # its primary config (config_name)
    module: str  # the family module with run(cfg, run_dir=None)


SCRIPTS = {
    "pretrain": Script("main_pretrain.py", "pretrain/pretrain", "src.experiments.pretrain"),
    "transfer": Script("main_transfer.py", "transfer/transfer", "src.experiments.transfer"),
    "flips": Script("main_flips.py", "prediction_flips/flips", "src.experiments.flips"),
    "multi_teacher": Script("main_multi_teacher.py", "multi_teacher/multi_teacher", "src.experiments.multi_teacher"),
}


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    overrides: Tuple[str, ...]
    expect: Tuple[str, ...]
    kind: str = "user"  # user | hydra
    subprocess: bool = False
    inprocess: bool = True
    requires: Tuple[str, ...] = ()
    copy: Tuple[str, ...] = ()  # (src, dst) or ("", dst): see the docstring
    locked: str = ""
    trains: bool = False


def C(id, script, overrides, expect, **kw) -> Case:  # noqa: N802  (short row constructor)
    return Case(id, script, tuple(overrides), tuple(expect), **kw)


T10 = "teacher={art}/teacher10"  # a teacher that needs no zoo training
CASES = [
    # ---------------------------------------------------------------- unknown names (with the closest valid ones)
    C("pretrain-unknown-zoo-name", "pretrain", ["name=mlp_smal"], ["'mlp_smal'", "mlp_small"]),
    C("pretrain-unknown-model", "pretrain", ["name=null", "model.arch=resnet9"], ["'resnet9'", "closest"]),
    C("pretrain-unknown-dataset", "pretrain", ["dataset.name=digitz"], ["'digitz'", "digits"]),
    C("pretrain-unknown-model-group", "pretrain", ["model=resnet9"], ["resnet9", "resnet8"], kind="hydra"),
    C("transfer-unknown-teacher", "transfer", ["teacher=mlp_smal"], ["'mlp_smal'", "mlp_small"]),
    C("transfer-unknown-student", "transfer", ["student=resnet21"], ["'resnet21'", "resnet20"]),
    C("transfer-unknown-arch-in-weights-spec", "transfer", [T10, "student=resnet9@{art}/resnet8.safetensors"],
      ["'resnet9'", "arch@weights_file"]),
    C("transfer-unknown-method", "transfer", ["method=nope"], ["nope", "kl_dp"], kind="hydra"),
    C("transfer-unknown-zoo", "transfer", ["zoo=nope"], ["nope", "digits"], kind="hydra"),
    # ------------------------------------------------------------------------------ missing / malformed data
    C("pretrain-missing-data-dir", "pretrain", ["dataset=cifar100"],
      ["cifar-100-python", "paths.data", "nothing is downloaded"]),
    C("pretrain-malformed-data-dir", "pretrain", ["dataset=imagefolder", "dataset.root={art}/emptyfolder"],
      ["no images", "emptyfolder"]),
    # ------------------------------------------------------------------------------------------ checkpoints
    C("transfer-truncated-weights", "transfer", [T10, "student=resnet8@{art}/trunc.safetensors"],
      ["trunc.safetensors", "corrupt or truncated"]),
    C("transfer-corrupt-checkpoint-folder", "transfer", ["teacher={art}/corrupt"],
      ["corrupt", "model.safetensors"]),
    C("transfer-corrupt-meta", "transfer", ["teacher={art}/badmeta"], ["meta.json", "corrupt"]),
    C("transfer-missing-weights-file", "transfer", [T10, "student=resnet8@{art}/nope.safetensors"],
      ["nope.safetensors", "does not exist"]),
    C("transfer-malicious-pickle", "transfer", [T10, "student=resnet8@{art}/evil.pt"],
      ["refusing to load", "evil.pt"], subprocess=True),
    C("transfer-other-architecture", "transfer", [T10, "student=resnet20@{art}/resnet8.safetensors"],
      ["resnet8.safetensors", "does not fit this architecture"]),
    # ------------------------------------------------------------------------------ label spaces / classes
    C("transfer-teacher-other-class-count", "transfer", ["teacher={art}/teacher5"],
      ["predicts 5 classes", "label space"]),
    C("transfer-teacher-weights-other-class-count", "transfer", ["teacher=mlp@{art}/mlp5.safetensors"],
      ["mlp5.safetensors", "label space"]),
    C("pretrain-num-classes-mismatch", "pretrain", ["dataset.num_classes=7"],
      ["dataset.num_classes=7", "dataset.num_classes=10"]),
    # ------------------------------------------------------------------------------- types and value ranges
    C("pretrain-lr-not-a-number", "pretrain", ["optimizer.lr=abc"], ["optimizer.lr", "abc"], kind="hydra",
      subprocess=True),
    C("pretrain-batch-size-float", "pretrain", ["loader.batch_size=1.5"], ["batch_size", "1.5"], kind="hydra"),
    C("pretrain-negative-lr", "pretrain", ["name=null", "model=mlp", "optimizer.lr=-0.1"],
      ["optimizer.lr=-0.1", "> 0"]),
    C("pretrain-zero-batch-size", "pretrain", ["name=null", "model=mlp", "loader.batch_size=0"],
      ["loader.batch_size=0", "> 0"]),
    C("pretrain-batch-larger-than-split", "pretrain", ["name=null", "model=mlp", "loader.batch_size=5000"],
      ["loader.batch_size=5000", "larger than", "'train'"]),
    C("pretrain-empty-subset-fraction", "pretrain", ["name=null", "model=mlp", "dataset.subset.fraction=0"],
      ["dataset.subset.fraction=0", "(0, 1]"]),
    C("pretrain-empty-subset-per-class", "pretrain", ["name=null", "model=mlp", "dataset.subset.per_class=0"],
      ["dataset.subset.per_class=0", "> 0"]),
    C("pretrain-zero-epochs", "pretrain", ["name=null", "model=mlp", "trainer.epochs=0"],
      ["trainer.epochs=0", "> 0"]),
    C("pretrain-negative-seed", "pretrain", ["trainer.seed=-1"], ["trainer.seed=-1", ">= 0"]),
    C("transfer-negative-lr", "transfer", ["optimizer.lr=-1"], ["optimizer.lr=-1", "> 0"]),
    C("transfer-temperature-zero", "transfer", ["method=kl", "method.temperature=0"],
      ["method.temperature=0", "> 0"]),
    C("transfer-temperature-negative", "transfer", ["method=crd", "method.temperature=-4"],
      ["method.temperature=-4", "> 0"]),
    C("transfer-top-p-zero", "transfer", ["top_p=0"], ["top_p=0", "(0, 100]"], subprocess=True),
    C("transfer-top-p-above-100", "transfer", ["top_p=150"], ["top_p=150", "(0, 100]"]),
    C("transfer-batch-larger-than-split", "transfer", [T10, "student=resnet8@{art}/resnet8.safetensors",
                                                       "loader.batch_size=100000"],
      ["loader.batch_size=100000", "larger than", "'transfer'"]),
    C("transfer-unknown-loader-dtype", "transfer", ["loader.dtype=float64"],
      ["loader.dtype='float64'", "float32, bfloat16, float16"]),
    # ------------------------------------------------------------------------------------- output directory
    C("pretrain-unwritable-output-dir", "pretrain", ["hydra.run.dir={art}/afile/run"],
      ["afile/run", "not writable", "hydra.run.dir"], subprocess=True, inprocess=False),
    # -------------------------------------------------------------------------------------- training itself
    C("pretrain-non-finite-loss", "pretrain", ["name=null", "model=mlp", "optimizer.lr=1e30",
                                               "trainer.max_steps=20"],
      ["non-finite", "optimizer.lr", "last good checkpoint"]),
    # ------------------------------------------------------------------------------------------------ flips
    C("flips-unknown-model", "flips", ["models=[mlp_small,lenett]"], ["'lenett'", "lenet"]),
    C("flips-temperature-zero", "flips", ["temperature=0"], ["temperature=0", "> 0"]),
    C("flips-kl-block-budget-zero", "flips", ["kl_max_gb=0"], ["kl_max_gb=0", "> 0"]),
    # ---------------------------------------------------------------------------------------- multi-teacher
    C("multi_teacher-unknown-teacher", "multi_teacher", ["teachers=[mlp_small,lenat]"],
      ["teachers[1]", "'lenat'", "lenet"], subprocess=True),
    C("multi_teacher-top-p-zero", "multi_teacher", ["top_p=0"], ["top_p=0", "(0, 100]"]),
    C("multi_teacher-teacher-other-class-count", "multi_teacher", ["teachers=[{art}/teacher10,{art}/teacher5]"],
      ["predicts 5 classes", "label space"]),
]

# ---- aft ----
SCRIPTS["aft"] = Script("main_aft.py", "aft/aft", "src.experiments.aft")
CASES += [
    C("aft-unknown-feature-model", "aft", ["features=[resnet20,wrn_16_3]"], ["features[1]", "'wrn_16_3'", "wrn_16_2"],
      subprocess=True),
    C("aft-negative-prec", "aft", ["method.prec=-1"], ["method.prec=-1", ">= 0"]),
    C("aft-unknown-kernel", "aft", ["method.kernel=poly"], ["method.kernel='poly'", "linear, rbf, none"]),
    C("aft-unknown-scales", "aft", ["method.scales=full"], ["method.scales='full'", "diag, dense"]),
    C("aft-augmented-inputs", "aft", ["method=aft_btune", "loader.augment=crop_flip"],
      ["loader.augment=crop_flip", "loader.augment=none"]),
    C("aft-no-feature-models", "aft", ["features=[]"], ["features=[]", "method=aft_init"]),
    C("aft-unknown-method", "aft", ["method=aft_btun"], ["aft_btun", "aft_btune"], kind="hydra"),
]

# ---- kdep ----
SCRIPTS["kdep"] = Script("main_kdep.py", "kdep/kdep", "src.experiments.kdep")
CASES += [
    C("kdep-unknown-student-arch", "kdep", ["student.arch=resnet9"], ["student.arch 'resnet9'", "resnet8"],
      subprocess=True),
    C("kdep-student-wider-than-teacher", "kdep", [T10], ["64-d pre-ReLU", "only 8", "d_student <= d_teacher"]),
    C("kdep-pts-temperature-zero", "kdep", ["method.pts_t=0"], ["method.pts_t=0", "> 0"]),
    C("kdep-unknown-baseline", "kdep", ["baselines=[scratch,imagenet]"], ["'imagenet' is unknown", "scratch"]),
    C("kdep-missing-basis-file", "kdep", ["basis={tmp}/nope.safetensors"], ["nope.safetensors", "basis=null"]),
    C("kdep-downstream-fraction", "kdep", ["downstream=[{{name:d,train_split:transfer,eval_split:test,fraction:1.5}}]"],
      ["fraction=1.5", "(0, 1]"]),
]

# ---- zeroshot ----
SCRIPTS["zeroshot"] = Script("main_zeroshot.py", "zeroshot/zeroshot", "src.experiments.zeroshot")
CASES += [
    C("zeroshot-attention-needs-stages", "zeroshot", ["teacher=mlp_small"],
      ["method.beta=15.625", "teacher 'mlp_small'", "set method.beta=0"], subprocess=True),
    C("zeroshot-zero-student-steps", "zeroshot", ["method.n_s=0"], ["method.n_s=0", ">= 1"]),
    C("zeroshot-zero-pseudo-batches", "zeroshot", ["pseudo_batches=0"], ["pseudo_batches=0", ">= 1"]),
    C("zeroshot-max-steps", "zeroshot", ["trainer.max_steps=10"], ["trainer.max_steps=10", "pseudo_batches=N"]),
    C("zeroshot-unknown-baseline", "zeroshot", ["baselines=[kd]"], ["'kd'", "kd_at, scratch"]),
    C("zeroshot-mte-window", "zeroshot", ["transition.mte_steps=500"], ["transition.mte_steps=500", "[1,"]),
]

# ---- issue 17: trust nothing on disk, every value checked up front by its full key -------------------------------
M = ["name=null", "model=mlp"]  # pretrain a plain model: no zoo
CASES += [
    # meaningless values that used to be accepted
    C("pretrain-scheduler-warmup-negative", "pretrain", [*M, "scheduler.warmup_epochs=-5"],
      ["scheduler.warmup_epochs=-5", ">= 0"]),
    C("pretrain-scheduler-step-size-zero", "pretrain", [*M, "scheduler=step", "scheduler.step_size=0"],
      ["scheduler.step_size=0", "> 0"]),
    C("pretrain-scheduler-gamma-negative", "pretrain", [*M, "scheduler=step", "scheduler.gamma=-1"],
      ["scheduler.gamma=-1", "(0, 1]"]),
    C("pretrain-scheduler-min-lr-ratio", "pretrain", [*M, "scheduler.min_lr_ratio=5"],
      ["scheduler.min_lr_ratio=5", "[0, 1]"]),
    C("transfer-temperature-inf", "transfer", ["method=kl", "method.temperature=inf"],
      ["method.temperature=inf", "finite"]),
    C("transfer-temperature-tiny", "transfer", ["method=kl", "method.temperature=1e-30"],
      ["method.temperature=1e-30", "[0.01, 1000]"]),
    C("pretrain-crop-padding-negative", "pretrain", [*M, "loader.crop_padding=-2"], ["loader.crop_padding=-2", ">= 0"]),
    C("pretrain-dataset-std-zero", "pretrain", [*M, "dataset.std=[0]"], ["dataset.std=[0", "> 0"]),
    C("pretrain-dataset-mean-inf", "pretrain", [*M, "dataset.mean=[inf]"], ["dataset.mean=[inf]", "finite"]),
    C("multi_teacher-order-split-test", "multi_teacher", ["order_split=test"], ["order_split=test", "order_split=val"]),
    # ImageNet's val_split is its test split (val_fraction 0): the fix is to hold a val split out, not the same value
    C("multi_teacher-imagenet-has-no-val", "multi_teacher", ["dataset=imagenet"],
      ["order_split=test", "dataset.val_fraction=0.02 order_split=val"]),
    C("multi_teacher-missing-soup-run", "multi_teacher", ["mode=soup", "soup_runs={{mlp_small:'{tmp}/nope'}}"],
      ["soup_runs.mlp_small=", "nope does not exist"]),
    C("aft-duplicate-features", "aft", ["features=[resnet20,resnet20]"], ["resnet20 twice", "once"]),
    C("aft-use-val-untyped", "aft", ["use_val=maybe"], ["use_val=maybe", "true or false"]),
    C("flips-csv-top1-nan", "flips", ["models=null", "models_csv={art}/nan.csv"],
      ["top1='nan'", "mlp_small", "finite"]),
    C("flips-csv-bom", "flips", ["models=null", "models_csv={art}/bom.csv"], ["'lenett'", "lenet"]),
    # writes where they must not
    C("pretrain-save-as-escapes", "pretrain", [*M, "save_as=../../../../x"], ["save_as='../../../../x'", "plain name"]),
    C("pretrain-save-as-absolute", "pretrain", [*M, "save_as=/tmp/x"], ["save_as='/tmp/x'", "plain name"]),
    C("pretrain-save-as-a-zoo-model", "pretrain", [*M, "save_as=lenet"], ["save_as=lenet", "would replace it",
                                                                          "save_as=lenet_mine"]),
    C("pretrain-save-as-the-gan", "pretrain", [*M, "save_as=gan"], ["save_as=gan", "zoo"]),
    C("pretrain-save-as-a-zoo-draw", "pretrain", [*M, "save_as=zoo_seed2"], ["save_as=zoo_seed2", "another zoo draw"]),
    C("transfer-amp-unknown", "transfer", [T10, "trainer.amp=fp8"], ["trainer.amp='fp8'", "none, bf16, fp16"]),
    C("pretrain-unknown-model-kwarg", "pretrain", [*M, "+model.kwargs.bogus=1"], ["bogus", "model.kwargs", "hidden"]),
    C("pretrain-checkpoints-below-a-file", "pretrain", [*M, "paths.checkpoints={art}/afile/ck"],
      ["paths.checkpoints=", "afile is a regular file"]),
    C("pretrain-cache-below-a-file", "pretrain", [*M, "paths.cache={art}/afile/c"],
      ["paths.cache=", "afile is a regular file"]),
    # tracebacks before
    C("transfer-crd-feat-dim-zero", "transfer", ["method=crd", "method.feat_dim=0"], ["method.feat_dim=0", ">= 1"]),
    C("pretrain-betas-empty", "pretrain", [*M, "optimizer=adam", "optimizer.betas=[]"],
      ["optimizer.betas=[]", "two numbers"]),
    C("pretrain-epochs-inf", "pretrain", [*M, "trainer.epochs=inf"], ["trainer.epochs=inf", "finite"]),
    C("pretrain-zoo-label-smoothing", "pretrain", ["name=mlp_small", "+zoo.models.mlp_small.label_smoothing=2"],
      ["zoo.models.mlp_small.label_smoothing=2", "[0, 1)"]),
    C("aft-label-smoothing", "aft", ["method=aft_init", "method.label_smoothing=2"],
      ["method.label_smoothing=2", "[0, 1)"]),
    C("pretrain-num-workers-negative", "pretrain", [*M, "loader.num_workers=-1"], ["loader.num_workers=-1", ">= 0"]),
    C("kdep-basis-wrong-rank", "kdep", ["basis={art}/basis_rank.safetensors"], ["basis_rank", "(D, k)"]),
    C("kdep-basis-wrong-shape", "kdep", ["basis={art}/basis_shape.safetensors"], ["basis_shape", "(5, 3)", "(D, k)"]),
    C("kdep-basis-nan", "kdep", ["basis={art}/basis_nan.safetensors"], ["basis_nan", "non-finite"]),
    C("kdep-basis-garbage", "kdep", ["basis={art}/basis_garbage.safetensors"], ["basis ", "basis_garbage", "corrupt"]),
    C("transfer-meta-is-a-list", "transfer", ["teacher={art}/metalist"], ["metalist/meta.json", "list", "delete"]),
    C("transfer-meta-without-arch", "transfer", ["teacher={art}/metanoarch"], ["metanoarch/meta.json", "no 'arch'"]),
    C("transfer-meta-is-a-folder", "transfer", ["teacher={art}/metadir"], ["metadir/meta.json", "is a folder"]),
    C("transfer-meta-hash-lie", "transfer", ["teacher={art}/hashlie"], ["hashlie", "does not match its meta.json"]),
    C("transfer-weights-swapped", "transfer", ["teacher={art}/swapped"], ["swapped", "does not match its meta.json"]),
    C("transfer-teacher-folder-is-a-file", "transfer", ["teacher={art}/afile"], ["afile is a regular file"]),
    # nested keys named by their full key
    C("kdep-finetune-lr", "kdep", ["finetune.optimizer.lr=-1"], ["finetune.optimizer.lr=-1", "> 0"]),
    C("kdep-finetune-step-size", "kdep", ["finetune.scheduler.step_size=0"], ["finetune.scheduler.step_size=0"]),
    C("kdep-finetune-batch-size", "kdep", ["finetune.loader.batch_size=0"], ["finetune.loader.batch_size=0"]),
    C("kdep-finetune-epochs-inf", "kdep", ["finetune.trainer.epochs=inf"], ["finetune.trainer.epochs=inf", "finite"]),
    C("zeroshot-few-shot-temperature", "zeroshot", ["few_shot.kd_at.temperature=0"],
      ["few_shot.kd_at.temperature=0", "> 0"]),
    C("zeroshot-few-shot-alpha", "zeroshot", ["few_shot.kd_at.alpha=3"], ["few_shot.kd_at.alpha=3", "[0, 1]"]),
    C("zeroshot-few-shot-lr", "zeroshot", ["few_shot.optimizer.lr=0"], ["few_shot.optimizer.lr=0", "> 0"]),
    C("zeroshot-few-shot-epochs", "zeroshot", ["few_shot.trainer.epochs=0"], ["few_shot.trainer.epochs=0"]),
    C("zeroshot-few-shot-min-lr-ratio", "zeroshot", ["+few_shot.scheduler.min_lr_ratio=3"],
      ["few_shot.scheduler.min_lr_ratio=3"]),
    C("multi_teacher-parallel-alpha", "multi_teacher", ["mode=parallel", "parallel_method.alpha=2"],
      ["parallel_method.alpha=2", "[0, 1]"]),
    C("multi_teacher-parallel-temperature-inf", "multi_teacher", ["mode=parallel", "parallel_method.temperature=inf"],
      ["parallel_method.temperature=inf", "finite"]),
    C("multi_teacher-parallel-partition", "multi_teacher", ["mode=parallel", "parallel_method.partition=self"],
      ["parallel_method.partition='self'", "most-conf, most-conf_u"]),
    C("pretrain-zoo-epochs", "pretrain", ["name=mlp_small", "zoo.models.mlp_small.epochs=0"],
      ["zoo.models.mlp_small.epochs=0", "> 0"]),
    C("pretrain-zoo-train-lr", "pretrain", ["name=lenet", "zoo.train.optimizer.lr=-1"], ["zoo.train.optimizer.lr=-1"]),
    C("pretrain-zoo-crop-padding", "pretrain", ["name=lenet", "zoo.train.crop_padding=-1"],
      ["zoo.train.crop_padding=-1"]),
    C("pretrain-zoo-warmup", "pretrain", ["name=lenet", "zoo.train.scheduler.warmup_epochs=-1"],
      ["zoo.train.scheduler.warmup_epochs=-1"]),
    # late failures moved before any work
    C("kdep-unknown-downstream-split", "kdep", ["downstream=[{{name:d,train_split:trnsfer,eval_split:test}}]"],
      ["downstream d", "train_split=trnsfer", "transfer"]),
    C("transfer-unknown-partition", "transfer", ["method=kl_dp", "method.partition=most-conff"],
      ["method.partition='most-conff'", "closest", "most-conf"]),
    C("flips-plot-pair-unknown", "flips", ["plot_pair=[mlp_small,nope]"], ["plot_pair=", "nope", "pick two"]),
    C("transfer-kl-alpha", "transfer", ["method=kl", "method.alpha=2"], ["method.alpha=2", "[0, 1]"]),
    C("transfer-crd-momentum", "transfer", ["method=crd", "method.momentum=1"], ["method.momentum=1", "[0, 1)"]),
    C("transfer-mcl-ema-tau", "transfer", ["method=mcl", "method.ema_tau=1"], ["method.ema_tau=1", "[0, 1)"]),
    C("transfer-kl-topk-negative", "transfer", ["method=kl", "method.topk=-1"], ["method.topk=-1", ">= 0"]),
    # finite checks for every float
    C("pretrain-lr-nan", "pretrain", [*M, "optimizer.lr=nan"], ["optimizer.lr=nan", "finite"]),
    C("pretrain-weight-decay-inf", "pretrain", [*M, "optimizer.weight_decay=inf"],
      ["optimizer.weight_decay=inf", "finite"]),
    C("pretrain-grad-clip-inf", "pretrain", [*M, "trainer.grad_clip=inf"], ["trainer.grad_clip=inf", "finite"]),
    C("pretrain-eval-every-zero", "pretrain", [*M, "trainer.eval_every=0"], ["trainer.eval_every=0", ">= 1"]),
    C("pretrain-keep-checkpoints-zero", "pretrain", [*M, "trainer.keep_checkpoints=0"],
      ["trainer.keep_checkpoints=0", ">= 1"]),
    C("pretrain-progress-unknown", "pretrain", [*M, "trainer.progress=maybe"],
      ["trainer.progress='maybe'", "auto, on, off"]),
    C("transfer-eval-every-steps-zero", "transfer", [T10, "trainer.eval_every_steps=0"],
      ["trainer.eval_every_steps=0", ">= 1"]),
    C("transfer-ckpt-every-steps-negative", "transfer", [T10, "trainer.ckpt_every_steps=-5"],
      ["trainer.ckpt_every_steps=-5", ">= 1"]),
    C("aft-prior-lr-inf", "aft", ["method.prior_lr=inf"], ["method.prior_lr=inf", "finite"]),
    C("aft-prec-nan", "aft", ["method.prec=nan"], ["method.prec=nan", "finite"]),
    C("kdep-loss-w-inf", "kdep", ["method.loss_w=inf"], ["method.loss_w=inf", "finite"]),
    C("kdep-pts-t-tiny", "kdep", ["method.pts_t=1e-9"], ["method.pts_t=1e-09", "[0.01, 1000]"]),
    C("zeroshot-beta-inf", "zeroshot", ["method.beta=inf"], ["method.beta=inf", "finite"]),
    C("zeroshot-generator-lr-nan", "zeroshot", ["method.generator_lr=nan"], ["method.generator_lr=nan", "finite"]),
    C("transfer-crd-nce-t-inf", "transfer", ["method=crd", "method.nce_t=inf"], ["method.nce_t=inf", "finite"]),
    C("transfer-mixup-inf", "transfer", ["method=kl", "method.mixup_alpha=inf"], ["method.mixup_alpha=inf", "finite"]),
]

# ---- seeds ----
CASES += [
    C("pretrain-negative-zoo-seed", "pretrain", ["zoo.seed=-1"], ["zoo.seed=-1", "integer >= 0"]),
    C("transfer-fractional-zoo-seed", "transfer", ["zoo.seed=1.5"], ["zoo.seed=1.5", "integer >= 0"]),
]

# ---- synthetic distillation data (method.synth_ratio / synth_source); {art}/gan3x32 is a 3x32x32 generator ----
CASES += [
    C("transfer-synth-ratio-one", "transfer", ["method.synth_ratio=1.0"], ["method.synth_ratio=1.0", "[0, 1)"]),
    C("transfer-synth-ratio-negative", "transfer", ["method.synth_ratio=-0.2"], ["method.synth_ratio=-0.2", "[0, 1)"]),
    C("transfer-synth-generator-shape", "transfer", [T10, "method.synth_ratio=0.2", "method.synth_source={art}/gan3x32"],
      ["makes 3x32x32 images", "1x8x8", "main_pretrain.py name=gan"]),
    C("transfer-synth-not-a-generator", "transfer",
      [T10, "method.synth_ratio=0.2", "method.synth_source={art}/teacher10"],
      ["teacher10 is not a generator", "mlp classifier", "zoo generator name"]),
    C("transfer-synth-unknown-source", "transfer", ["method.synth_ratio=0.2", "method.synth_source=gann"],
      ["method.synth_source=gann", "closest: gan"]),
]

# ---- the last cases: damaged FFCV files, permissions, a diverging method -------------------------------------------
FF = [*M, "loader=ffcv", "loader.num_workers=1", "loader.device=cpu"]
CASES += [
    C("pretrain-ffcv-empty-beton", "pretrain", [*FF, "loader.ffcv_dir={art}/ffcv_empty"],
      ["ffcv_empty/digits_", ".beton", "empty (0 bytes)", "python scripts/write_ffcv.py dataset=digits ",
       "dataset.num_classes=10 --splits", "--overwrite"], requires=("ffcv",)),
    C("pretrain-ffcv-truncated-beton", "pretrain", [*FF, "loader.ffcv_dir={art}/ffcv_trunc"],
      ["ffcv_trunc/digits_", ".beton", "truncated", "100 of 359 images", "python scripts/write_ffcv.py",
       "--overwrite"], requires=("ffcv",)),
    C("pretrain-checkpoints-not-writable", "pretrain", [*M, "paths.checkpoints={tmp}/locked"],
      ["paths.checkpoints=", "locked is not writable", "Permission denied", "chmod u+rwx", "paths.checkpoints=<"],
      copy=("", "{tmp}/locked"), locked="{tmp}/locked"),
    C("pretrain-cache-not-writable", "pretrain", [*M, "paths.cache={tmp}/locked"],
      ["paths.cache=", "locked is not writable", "Permission denied", "paths.cache=<"],
      copy=("", "{tmp}/locked"), locked="{tmp}/locked"),
    C("transfer-weights-not-readable", "transfer", [T10, "student=resnet8@{tmp}/locked.safetensors"],
      ["locked.safetensors is not readable", "Permission denied", "chmod a+r"],
      copy=("{art}/resnet8.safetensors", "{tmp}/locked.safetensors"), locked="{tmp}/locked.safetensors"),
    C("transfer-teacher-weights-not-readable", "transfer", ["teacher={tmp}/lockedteacher"],
      ["lockedteacher/model.safetensors is not readable", "chmod a+r"],
      copy=("{art}/teacher10", "{tmp}/lockedteacher"), locked="{tmp}/lockedteacher/model.safetensors"),
    C("transfer-non-finite-loss", "transfer", [T10, "student={art}/other10", "method=kl_dp", "optimizer.lr=1e30",
                                               "trainer.max_steps=20"],
      ["non-finite loss at step", "method=kl_dp (KLDP)", "method.temperature=1.0", "optimizer.lr=1e+30",
       "lower optimizer.lr", "last good checkpoint"], trains=True),
]

# ---- a method of another family (issue 22.2): one line naming its family and this family's methods ----
CASES += [
    C("transfer-method-of-aft", "transfer", ["method=aft"],
      ["method=aft (AFT)", "main_aft.py", "main_transfer.py takes method=cd, crd, kl, kl_dp"]),
    C("transfer-method-of-kdep", "transfer", ["method=kdep"], ["method=kdep (KDEP)", "main_kdep.py", "kl_dp_u"],
      subprocess=True),
    C("kdep-method-of-transfer", "kdep", ["method=kl_dp"], ["method=kl_dp (KLDP)", "main_transfer.py",
                                                            "main_kdep.py takes method=kdep"]),
    C("aft-method-of-transfer", "aft", ["method=crd"], ["method=crd (CRD)", "main_transfer.py", "aft_btune"]),
]

# ---- hub weights that cannot be had offline: known before any work (issue 27.2: KDEP's `supervised` was first
# looked up after the distillation) ----
CASES += [
    C("kdep-supervised-hub-weights-offline", "kdep", ["supervised=resnet18.tv_in1k"],
      ["timm model 'resnet18.tv_in1k' (supervised)", "not in the HF cache", "resnet18.tv_in1k@/path/to/weights"]),
    C("transfer-teacher-hub-weights-offline", "transfer", ["teacher=resnet18"],
      ["timm model 'resnet18' (teacher)", "not in the HF cache", "huggingface-cli download timm/resnet18.a1_in1k"]),
]
