#!/usr/bin/env bash
# Download a public clinical dataset and convert it to the segx_helpers dataset format.
# Run ./data_download.sh -h for the usage.
set -euo pipefail

# ------------------------------------------------------------------------------------------ sources
# dataset|key|file|default URL|sha256 ("" = no known checksum: the file is used, reported as not verified)
# SEGX_<DATASET>_URL (e.g. SEGX_HAM10000_URL, SEGX_CHESTX_DET10_URL) replaces the folder of every URL
# of that dataset: the file is then fetched from "$SEGX_<DATASET>_URL/<file>".
# SEGX_<KEY>_SHA256 (e.g. SEGX_SHENZHEN_SHA256) sets the checksum a file must have.
# Every default URL is HTTPS. A host in HTTP_FALLBACK_HOSTS whose HTTPS fails (no TLS on it) is retried
# over plain HTTP, with a note. The SHA-256 of every file is recorded in <raw>/SHA256SUMS after a
# successful download and checked on every re-run, so a file without a known checksum cannot change
# unnoticed between runs.
# isic2018-trap: the ISIC 2018 challenge archive (images, lesion masks) and, from a pinned commit of
# github.com/alceubissoto/debiasing-skin, the artefact annotations and the files of the chosen trap set
# (rows named isic2018-trap/<N> belong to trap set N only; the CSVs come first, so they fail fast).
ISIC_ARCHIVE="https://isic-challenge-data.s3.amazonaws.com/2018"
DEBIASING_SKIN="https://raw.githubusercontent.com/alceubissoto/debiasing-skin/f93c8654f50c581544f32ad6b1450cb925a176ff"
SOURCES=(
  "ham10000|HAM10000|HAM10000_dataverse.zip|https://dataverse.harvard.edu/api/access/dataset/:persistentId/?persistentId=doi:10.7910/DVN/DBW86T&format=original|"
  "shenzhen|SHENZHEN|ChinaSet_AllFiles.zip|https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip|"
  "montgomery|MONTGOMERY|NLM-MontgomeryCXRSet.zip|https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip|"
  "chestx-det10|CHESTX_DET10_TRAIN_JSON|train.json|https://raw.githubusercontent.com/Deepwise-AILab/ChestX-Det10-Dataset/c535e9a32995e6d6a44dea810501190b18ed264d/train.json|8e9dd7123bdd9e5ce8d8cd7bd304fd24afdf0081930654b82c2003422d59de9c"
  "chestx-det10|CHESTX_DET10_TEST_JSON|test.json|https://raw.githubusercontent.com/Deepwise-AILab/ChestX-Det10-Dataset/c535e9a32995e6d6a44dea810501190b18ed264d/test.json|c18482a77111186789c67d836db27a522c717cdb638eff59bc463362a60a46f1"
  "chestx-det10|CHESTX_DET10_TRAIN_IMAGES|train_data.zip|https://resource.deepwise.com/xraychallenge/train_data.zip|"
  "chestx-det10|CHESTX_DET10_TEST_IMAGES|test_data.zip|https://resource.deepwise.com/xraychallenge/test_data.zip|"
  "isic2018-trap|ISIC_BIAS_CSV|isic_bias.csv|$DEBIASING_SKIN/artefacts-annotation/isic_bias.csv|04fbb74b44d33498afd41a66cfd73e500c2b197e540feb7f4a7553dc8023ddc8"
  "isic2018-trap/1|ISIC_TRAP_TRAIN1_CSV|isic_annotated_train1.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_train1.csv|004e4461e430e887c2fdfc2185d459cecee6e90fbd51e5dc0d650cb31d781c49"
  "isic2018-trap/1|ISIC_TRAP_VAL1_CSV|isic_annotated_val1.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_val1.csv|a8cd9fe473202d62d2778bc96ddf767f1bff7c4222bb9487eb51667475eab254"
  "isic2018-trap/1|ISIC_TRAP_TEST1_CSV|isic_annotated_test1.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_test1.csv|3f20b79d191f2d3c69ab9e03b285dc36cf3608dc096553e8093f2fbca4dcbfc2"
  "isic2018-trap/2|ISIC_TRAP_TRAIN2_CSV|isic_annotated_train2.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_train2.csv|62301111f20d42c9f9c35e7c00c43172d4b70cf54854b58db60e1a88e1a20371"
  "isic2018-trap/2|ISIC_TRAP_VAL2_CSV|isic_annotated_val2.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_val2.csv|2d6bb172a0be04b5d3d2dcc13ccbdc517971b1f8f7fe49f1445122204620bd12"
  "isic2018-trap/2|ISIC_TRAP_TEST2_CSV|isic_annotated_test2.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_test2.csv|e2069b54192aa451315508ff1f6923bdf5478e6628e707489867edd730597c54"
  "isic2018-trap/3|ISIC_TRAP_TRAIN3_CSV|isic_annotated_train3.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_train3.csv|3831795fb2bfd33e75a46c5bf4106d9b174cd3a2d9d93a67209852b8aec52ecc"
  "isic2018-trap/3|ISIC_TRAP_VAL3_CSV|isic_annotated_val3.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_val3.csv|8d12e942108c3353960f3d7fdd1910cf094c92c79d13bbd396fe53fa759426ad"
  "isic2018-trap/3|ISIC_TRAP_TEST3_CSV|isic_annotated_test3.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_test3.csv|fd8f3fb9da774db1376a8ee5673b8f7ae0c32f078258053adca47822fdafa1d5"
  "isic2018-trap/4|ISIC_TRAP_TRAIN4_CSV|isic_annotated_train4.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_train4.csv|24e0fccf6ac16effb62dc0fda0e736ccf0165d55dbbfa98622f584e4f63b101a"
  "isic2018-trap/4|ISIC_TRAP_VAL4_CSV|isic_annotated_val4.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_val4.csv|49dfdef7ad1c8d2ed237997565850912ed2bea29a407c012b0c89af8759d5840"
  "isic2018-trap/4|ISIC_TRAP_TEST4_CSV|isic_annotated_test4.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_test4.csv|1d268034ff9ca40758784f4f1cec460ef678e6e46f4db0e228e5cd9505facb2b"
  "isic2018-trap/5|ISIC_TRAP_TRAIN5_CSV|isic_annotated_train5.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_train5.csv|116a11f111f89b51adf9b9c16bf8604797c3891fda346f2631a0bfcaf5a91926"
  "isic2018-trap/5|ISIC_TRAP_VAL5_CSV|isic_annotated_val5.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_val5.csv|ce9c08147745b33e9cee0d44eb1a5a9b357a9755fe951a44ae6c994cf5489f4f"
  "isic2018-trap/5|ISIC_TRAP_TEST5_CSV|isic_annotated_test5.csv|$DEBIASING_SKIN/trap-sets/isic_annotated_test5.csv|562d5ea2e4dddb6fb8486b335028a7fc480e3e23f57cd1f3ccb119d2ddb41b37"
  "isic2018-trap|ISIC2018_TASK1_INPUT|ISIC2018_Task1-2_Training_Input.zip|$ISIC_ARCHIVE/ISIC2018_Task1-2_Training_Input.zip|"
  "isic2018-trap|ISIC2018_TASK1_GROUNDTRUTH|ISIC2018_Task1_Training_GroundTruth.zip|$ISIC_ARCHIVE/ISIC2018_Task1_Training_GroundTruth.zip|"
)
HTTP_FALLBACK_HOSTS="resource.deepwise.com"
KAGGLE_BUNDLE="mingchengzhu/segx-used-datasets"
KAGGLE_FILE="segx-used-datasets.zip"
DATASETS="ham10000 shenzhen montgomery chestx-det10 isic2018-trap segx-kaggle"

usage() {
  cat <<EOF
usage: ./data_download.sh <dataset> [--data-dir DIR] [--which ham|chestx] [--trap-set N] [--split trap|random]

Downloads <dataset> into DIR/<dataset>/raw/ (default DIR: data), checks the SHA-256 of every file
whose checksum is known, unpacks it and converts it to DIR/<dataset>/dataset/ with
segx_helpers.cli.convert. Downloads resume where they stopped; a file already downloaded and
verified is not fetched again; an existing converted dataset is never overwritten. The SHA-256
of every downloaded file is recorded in DIR/<dataset>/raw/SHA256SUMS and checked on re-runs; a
file that fails a check, or an archive that cannot be unpacked, is moved aside as <file>.bad.

datasets:
  ham10000      HAM10000 dermoscopy, 7 classes, with lesion masks (Harvard Dataverse, CC BY-NC 4.0)
  shenzhen      Shenzhen tuberculosis chest X-rays (NLM); lung masks are a separate manual download
  montgomery    Montgomery County tuberculosis chest X-rays with lung masks (NLM)
  chestx-det10  ChestX-Det10, 10 chest X-ray findings (Deepwise); no lung masks
  isic2018-trap ISIC 2018 Task 1 dermoscopy (2,594 images, expert lesion masks, CC BY-NC) with the
                benign/malignant labels, artefact flags and "trap" split of Bissoto et al. 2020
                (artefacts go with malignancy in train and against it in test); --trap-set N (1-5,
                default 1) picks the split; converted at 256 px to DIR/isic2018-trap/dataset/
                (DIR/isic2018-trap<N>/dataset/ for N > 1). --split random makes a stratified random
                7:1:2 split of all 2,594 images instead (seed 0), in DIR/isic2018-random/dataset/.
                The image archive is about 11 GB.
  segx-kaggle   the SegX authors' Kaggle bundle $KAGGLE_BUNDLE (needs a Kaggle account,
                the kaggle CLI and an API token); --which picks its ham (default) or chestx part,
                converted to DIR/segx-kaggle-<which>/dataset/

environment:
  SEGX_<DATASET>_URL   fetch that dataset's files from this folder URL instead (e.g. SEGX_SHENZHEN_URL)
  SEGX_<KEY>_SHA256    expected checksum of one file (keys: ${KEYS[*]} KAGGLE)
EOF
}

die() {
  echo "error: $*" >&2
  exit 1
}

# usage_error MESSAGE: a wrong command line: one line saying what is wrong, a pointer to -h, exit 2.
usage_error() {
  echo "error: $*" >&2
  echo "run ./data_download.sh -h for the usage" >&2
  exit 2
}

# The temporary curl log is removed however the script ends (error, Ctrl-C, kill).
TMP_LOG=""
cleanup() {
  [[ -z $TMP_LOG ]] || rm -f "$TMP_LOG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sha256_of() {
  if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# recorded FILE: the sha256 recorded for FILE in its folder's SHA256SUMS ("" if none).
recorded() {
  local manifest
  manifest="$(dirname "$1")/SHA256SUMS"
  [[ -f $manifest ]] || return 0
  awk -v name="$(basename "$1")" '$2 == name { print $1 }' "$manifest" | tail -n 1
}

# record FILE SHA256 (SHA256 "" forgets FILE): keep one line per file in its folder's SHA256SUMS.
record() {
  local manifest name lines
  manifest="$(dirname "$1")/SHA256SUMS"
  name=$(basename "$1")
  lines=""
  [[ ! -f $manifest ]] || lines=$(awk -v name="$name" '$2 != name' "$manifest")
  { [[ -z $lines ]] || printf '%s\n' "$lines"; [[ -z $2 ]] || printf '%s  %s\n' "$2" "$name"; } >"$manifest.tmp"
  mv -f "$manifest.tmp" "$manifest"
}

# set_aside FILE REASON: move FILE to FILE.bad, forget its recorded checksum, and stop the script.
set_aside() {
  mv -f "$1" "$1.bad"
  record "$1" ""
  die "$2; moved it aside to $1.bad (delete it and re-run to download again)"
}

# verify FILE KEY EXPECTED: check FILE against EXPECTED, else against the sha256 recorded when it was
# downloaded; a mismatch moves FILE aside to FILE.bad and stops the script.
verify() {
  local file=$1 key=$2 expected=$3 actual before
  actual=$(sha256_of "$file")
  before=$(recorded "$file")
  if [[ -n $expected && $actual == "$expected" ]]; then
    echo "$(basename "$file"): sha256 verified"
  elif [[ -n $expected ]]; then
    set_aside "$file" "$(basename "$file") has sha256 $actual but $expected was expected"
  elif [[ -n $before && $actual == "$before" ]]; then
    echo "$(basename "$file"): sha256 $actual matches the sha256 recorded at download in $(dirname "$file")/SHA256SUMS (no published checksum; set SEGX_${key}_SHA256 to check it)"
  elif [[ -n $before ]]; then
    set_aside "$file" "$(basename "$file") changed since it was downloaded: sha256 $actual, but $before was recorded in $(dirname "$file")/SHA256SUMS"
  else
    echo "$(basename "$file"): sha256 $actual (not verified: no known checksum; set SEGX_${key}_SHA256 to check it; recorded in $(dirname "$file")/SHA256SUMS and checked on re-runs)"
  fi
}

# download URL TARGET: resumable download into TARGET.part, renamed to TARGET when complete. An
# https:// URL of a host in HTTP_FALLBACK_HOSTS whose HTTPS fails is retried once over plain HTTP.
download() {
  local url=$1 target=$2 host log code rc=0
  host=${url#*://}
  host=${host%%/*}
  TMP_LOG=$(mktemp)
  log=$TMP_LOG
  echo "downloading $(basename "$target") from $host ..."
  code=$(curl -fsSL --retry 3 --connect-timeout 30 -C - -w '%{http_code}' -o "$target.part" "$url" 2>"$log") || rc=$?
  if [[ $url == https://* && " $HTTP_FALLBACK_HOSTS " == *" $host "* ]] &&
    ((rc == 7 || rc == 35 || rc == 51 || rc == 53 || rc == 54 || rc == 58 || rc == 59 || rc == 60 || rc == 77 || rc == 80 || rc == 83 || rc == 90 || rc == 91)); then
    echo "note: HTTPS failed for $host (curl exit $rc); falling back to plain HTTP for $(basename "$target") (its sha256 is recorded and checked on re-runs)"
    url="http://${url#https://}"
    rc=0
    code=$(curl -fsSL --retry 3 --connect-timeout 30 -C - -w '%{http_code}' -o "$target.part" "$url" 2>"$log") || rc=$?
  fi
  if ((rc == 33)); then # the server cannot resume: start again from the beginning
    rm -f "$target.part"
    rc=0
    code=$(curl -fsSL --retry 3 --connect-timeout 30 -w '%{http_code}' -o "$target.part" "$url" 2>"$log") || rc=$?
  fi
  if ((rc == 22)) && [[ $code == 416 ]]; then # nothing left to fetch: the partial file was complete
    rc=0
  fi
  if ((rc == 6 || rc == 7 || rc == 28)); then
    die "cannot reach $host: you seem to be offline; download $url manually, save it as $target and re-run"
  elif ((rc != 0)); then
    local reason
    reason=$(head -n 1 "$log")
    die "download of $url failed (curl exit $rc: ${reason:-no message}); re-run to retry (a partial download is resumed)"
  fi
  rm -f "$log"
  TMP_LOG=""
  mv -f "$target.part" "$target"
}

# unpack ARCHIVE DIR: extract a zip into DIR, then every zip it contained next to itself (into a folder
# named after it, unless its entries already sit in that folder). Done once: a stamp file remembers it.
unpack() {
  local archive=$1 dir=$2 stamp
  stamp="$dir/.$(basename "$archive").unpacked"
  [[ -f $stamp ]] && return 0
  echo "unpacking $(basename "$archive") ..."
  local rc=0
  "$PY" - "$archive" "$dir" <<'PYTHON' || rc=$?
import sys
import zipfile
import zlib
from pathlib import Path


def extract(archive: Path, dest: Path) -> list[Path]:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
        zf.extractall(dest, members=names)
    return [dest / n for n in names if n.lower().endswith(".zip")]


try:
    for inner in extract(Path(sys.argv[1]), Path(sys.argv[2])):
        with zipfile.ZipFile(inner) as zf:
            nested = all(n.startswith(inner.stem + "/") for n in zf.namelist())
        extract(inner, inner.parent if nested else inner.parent / inner.stem)
        inner.unlink()
except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(3)
PYTHON
  if ((rc == 3)); then
    set_aside "$archive" "$(basename "$archive") is not a valid zip archive (a corrupt or incomplete download)"
  elif ((rc != 0)); then
    die "unpacking $(basename "$archive") failed (exit $rc)"
  fi
  touch "$stamp"
}

# fetch KEY FILE URL SHA256: download FILE into $RAW unless it is already there and verified.
fetch() {
  local key=$1 file=$2 url=$3 expected=$4 override
  override="SEGX_${key}_SHA256"
  expected=${!override:-$expected}
  if [[ -f $RAW/$file ]]; then
    echo "$file: already downloaded, not fetching it again"
  else
    download "$url" "$RAW/$file"
  fi
  verify "$RAW/$file" "$key" "$expected"
  [[ $file != *.zip ]] || unpack "$RAW/$file" "$RAW"
  record "$RAW/$file" "$(sha256_of "$RAW/$file")"
}

fetch_kaggle() {
  command -v kaggle >/dev/null ||
    die "segx-kaggle needs the kaggle CLI (pip install kaggle) and a Kaggle account; see https://www.kaggle.com/docs/api"
  local config=${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}
  if [[ ! -f $config/kaggle.json && (-z ${KAGGLE_USERNAME:-} || -z ${KAGGLE_KEY:-}) ]]; then
    die "no Kaggle credentials: create an API token on https://www.kaggle.com/settings (Account > API > Create New Token) and save it as $config/kaggle.json, or set KAGGLE_USERNAME and KAGGLE_KEY"
  fi
  if [[ -f $RAW/$KAGGLE_FILE ]]; then
    echo "$KAGGLE_FILE: already downloaded, not fetching it again"
  else
    echo "downloading $KAGGLE_BUNDLE from Kaggle ..."
    kaggle datasets download "$KAGGLE_BUNDLE" -p "$RAW" ||
      die "the Kaggle download of $KAGGLE_BUNDLE failed (offline, or its terms not accepted on https://www.kaggle.com/datasets/$KAGGLE_BUNDLE?)"
  fi
  verify "$RAW/$KAGGLE_FILE" KAGGLE "${SEGX_KAGGLE_SHA256:-}"
  unpack "$RAW/$KAGGLE_FILE" "$RAW"
  record "$RAW/$KAGGLE_FILE" "$(sha256_of "$RAW/$KAGGLE_FILE")"
}

# ------------------------------------------------------------------------------------------- main
KEYS=()
for row in "${SOURCES[@]}"; do
  IFS='|' read -r _ key _ _ _ <<<"$row"
  KEYS+=("$key")
done

DATASET=""
DATASET_GIVEN=0
DATA_DIR=data
WHICH=ham
TRAP_SET=""
SPLIT=""
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --data-dir)
      [[ $# -ge 2 ]] || usage_error "--data-dir needs a folder"
      [[ -n $2 ]] || usage_error "--data-dir must not be empty (it would put the data at the filesystem root)"
      [[ $2 != -* ]] || usage_error "--data-dir needs a folder, got the option '$2' (write ./$2 for a folder of that name)"
      DATA_DIR=$2
      shift 2
      ;;
    --which) [[ $# -ge 2 ]] || usage_error "--which needs ham or chestx"; WHICH=$2; shift 2 ;;
    --trap-set) [[ $# -ge 2 ]] || usage_error "--trap-set needs a number from 1 to 5"; TRAP_SET=$2; shift 2 ;;
    --split) [[ $# -ge 2 ]] || usage_error "--split needs trap or random"; SPLIT=$2; shift 2 ;;
    -*) usage_error "unknown option '$1'" ;;
    *)
      ((!DATASET_GIVEN)) || usage_error "give one dataset, got '$DATASET' and '$1' (run the script once per dataset)"
      DATASET=$1
      DATASET_GIVEN=1
      shift
      ;;
  esac
done
((DATASET_GIVEN)) || usage_error "no dataset given; choose one of: $DATASETS"
[[ -n $DATASET ]] || usage_error "the dataset name is empty; choose one of: $DATASETS"
KNOWN=0
for name in $DATASETS; do
  [[ $name != "$DATASET" ]] || KNOWN=1
done
((KNOWN)) || usage_error "unknown dataset '$DATASET'; choose one of: $DATASETS"
[[ $WHICH == ham || $WHICH == chestx ]] || usage_error "--which must be ham or chestx, got '$WHICH'"
[[ -z $TRAP_SET || $DATASET == isic2018-trap ]] || usage_error "--trap-set applies to isic2018-trap only"
TRAP_SET=${TRAP_SET:-1}
[[ $TRAP_SET =~ ^[1-5]$ ]] || usage_error "--trap-set must be a number from 1 to 5, got '$TRAP_SET'"
[[ -z $SPLIT || $DATASET == isic2018-trap ]] || usage_error "--split applies to isic2018-trap only"
SPLIT=${SPLIT:-trap}
[[ $SPLIT == trap || $SPLIT == random ]] || usage_error "--split must be trap or random, got '$SPLIT'"
[[ $SPLIT == trap || $TRAP_SET == 1 ]] || usage_error "--trap-set and --split random exclude each other"
[[ ! -e $DATA_DIR || -d $DATA_DIR ]] || usage_error "--data-dir $DATA_DIR exists and is not a folder"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY="$REPO/.venv/bin/python"
[[ -x $PY ]] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

RAW="$DATA_DIR/$DATASET/raw"
OUT="$DATA_DIR/$DATASET/dataset"
[[ $DATASET != segx-kaggle ]] || OUT="$DATA_DIR/segx-kaggle-$WHICH/dataset"
[[ $DATASET != isic2018-trap || $TRAP_SET == 1 ]] || OUT="$DATA_DIR/isic2018-trap$TRAP_SET/dataset"
[[ $SPLIT != random ]] || OUT="$DATA_DIR/isic2018-random/dataset"
if [[ -e $OUT ]]; then
  echo "$OUT already exists; not overwriting it (delete it yourself to convert again)."
  exit 0
fi
mkdir -p -- "$RAW" 2>/dev/null || die "cannot create the folder $RAW (is a part of it a file, or not writable?)"

if [[ $DATASET == segx-kaggle ]]; then
  fetch_kaggle
else
  url_override="SEGX_$(tr 'a-z-' 'A-Z_' <<<"$DATASET")_URL"
  for row in "${SOURCES[@]}"; do
    IFS='|' read -r name key file url sha <<<"$row"
    [[ $name == "$DATASET" || $name == "$DATASET/$TRAP_SET" ]] || continue
    [[ -z ${!url_override:-} ]] || url="${!url_override%/}/$file"
    fetch "$key" "$file" "$url" "$sha"
  done
fi

case $DATASET in
  ham10000) echo "note: HAM10000 is licensed CC BY-NC 4.0 (non-commercial use only); cite Tschandl et al. 2018." ;;
  shenzhen) echo "note: the NLM archive has no lung masks; they are a manual download (566 of 662 images): https://doi.org/10.17632/8gf9vpkhgy.2 or https://www.kaggle.com/datasets/yoctoman/shcxr-lung-mask (Kaggle account). Put them as <name>_mask.png in a masks/ folder next to CXR_png/, delete $OUT and re-run." ;;
  chestx-det10) echo "note: ChestX-Det10 has no lung masks; put any you have as masks/<image>.png next to train.json, delete $OUT and re-run." ;;
  isic2018-trap) echo "note: ISIC 2018 images and masks are licensed CC BY-NC 4.0 (non-commercial use only); cite Codella et al. 2019 and Tschandl et al. 2018, and for the artefact annotations and trap sets Bissoto, Valle, Avila 2020." ;;
esac

CONVERT_OPTIONS=(--which "$WHICH")
[[ $DATASET != isic2018-trap ]] || CONVERT_OPTIONS=(--trap-set "$TRAP_SET" --split "$SPLIT" --image-size 256)
"$PY" -m segx_helpers.cli.convert "$DATASET" "$RAW" "$OUT" "${CONVERT_OPTIONS[@]}"
