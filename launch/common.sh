# Shell helpers shared by the launch scripts (sourced, not run): their options, the command
# every process runs, and printing commands for --dry-run.
#
# A script declares its options and environment variables, then parses its arguments:
#   options '-n|--num-processes=2' --config=configs/x.py --cpu
#   defaults PYTHON=python
#   parse_args "$@"
# and builds what each process runs with `main_args`.
# shellcheck shell=bash

# The checkout holding these scripts.
LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints the calling script's header comment (from line 2 to `set -euo pipefail`) as usage.
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

# Whether the first argument equals one of the others.
one_of() {
  local word="$1" item
  shift
  for item in "$@"; do [[ "$word" == "$item" ]] && return 0; done
  return 1
}

# The variable a long option names: --data-dir -> DATA_DIR.
option_var() { printf '%s' "${1#--}" | tr 'a-z-' 'A-Z_'; }

# Sets the variable a long option names to a value: set_option --data-dir DIR sets DATA_DIR.
set_option() { printf -v "$(option_var "$1")" '%s' "$2"; }

# Gives each variable its default: VAR=VALUE where the environment leaves VAR unset or empty,
# VAR?=VALUE only where it is unset (so that VAR="" turns the default off).
defaults() {
  local spec var
  for spec in "$@"; do
    var="${spec%%=*}"
    if [[ "$var" == *'?' ]]; then
      var="${var%'?'}"
      [[ -n "${!var+set}" ]] || printf -v "$var" '%s' "${spec#*=}"
    elif [[ -z "${!var:-}" ]]; then
      printf -v "$var" '%s' "${spec#*=}"
    fi
  done
}

# Declares the options `parse_args` takes; each is also an environment variable, which gives
# its default (the flag wins). --some-option=VALUE takes a value, into SOME_OPTION, default
# VALUE (--some-option?=VALUE: as VAR?=VALUE in `defaults`); a bare --switch sets SWITCH=1,
# default 0; '-x|--some-option=VALUE' adds a short name. Every script has --dry-run (DRY_RUN)
# and -h/--help.
options() {
  local spec names name
  VALUE_OPTIONS=() SWITCHES=(--dry-run) SHORT_NAMES=()
  defaults DRY_RUN=0
  for spec in "$@"; do
    names="${spec%%[?=]*}"
    name="${names##*|}"
    if [[ "$names" == *'|'* ]]; then SHORT_NAMES+=("${names%%|*}=$name"); fi
    if [[ "$spec" == *=* ]]; then
      VALUE_OPTIONS+=("$name")
      defaults "$(option_var "$name")${spec#"$names"}"
    else
      SWITCHES+=("$name")
      defaults "$(option_var "$name")=0"
    fi
  done
}

# Parses the command line by the options `options` declared: --option VALUE, --option=VALUE
# and --switch set their variables; the arguments after `--` (for metadiff_jax.main) go to
# EXTRA. Stops with one line for an unknown option or a missing value.
parse_args() {
  local arg name pair
  EXTRA=()
  while [[ $# -gt 0 ]]; do
    arg="$1"
    for pair in ${SHORT_NAMES[@]+"${SHORT_NAMES[@]}"}; do
      if [[ "$arg" == "${pair%%=*}" ]]; then arg="${pair#*=}"; fi
    done
    name="${arg%%=*}"
    if [[ "$arg" == -h || "$arg" == --help ]]; then
      usage
      exit 0
    elif [[ "$arg" == -- ]]; then
      shift
      EXTRA=("$@")
      break
    elif [[ "$arg" == --*=* ]] && one_of "$name" ${VALUE_OPTIONS[@]+"${VALUE_OPTIONS[@]}"}; then
      set_option "$name" "${arg#*=}"
    elif one_of "$arg" "${SWITCHES[@]}"; then
      set_option "$arg" 1
    elif one_of "$arg" ${VALUE_OPTIONS[@]+"${VALUE_OPTIONS[@]}"}; then
      [[ $# -ge 2 ]] || die "option $1 needs a value (see --help)"
      set_option "$arg" "$2"
      shift
    else
      die "unknown option '$1' (see --help; arguments for main go after --)"
    fi
    shift
  done
}

# Stops unless each named variable holds a positive integer.
positive_ints() {
  local var
  for var in "$@"; do
    [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, got '${!var}'"
  done
}

# Sets MAIN_ARGS to what follows `python` in every process's command:
#   -m metadiff_jax.main --config CONFIG --workdir WORKDIR [ARGS...] [EXTRA...] [EXTRA_ARGS...]
# ARGS are this function's arguments, EXTRA those given after `--`, and EXTRA_ARGS (from the
# environment) more arguments, space-separated.
main_args() {
  local more=()
  [[ -z "${EXTRA_ARGS:-}" ]] || read -r -a more <<< "$EXTRA_ARGS"
  MAIN_ARGS=(-m metadiff_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
             ${EXTRA[@]+"${EXTRA[@]}"} ${more[@]+"${more[@]}"})
}

# Prints its arguments as one shell-quoted command line (quotes only where needed; a
# --flag=value keeps the flag outside the quotes).
quote() {
  local out="" arg prefix
  for arg in "$@"; do
    prefix=""
    if [[ ! "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ && "$arg" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      prefix="${BASH_REMATCH[1]}" arg="${BASH_REMATCH[2]}"
    fi
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$prefix$arg "
    elif [[ "$arg" != *\'* ]]; then
      out+="$prefix'$arg' "
    elif [[ "$arg" != *[\"\$\`\\!]* ]]; then
      out+="$prefix\"$arg\" "
    else
      out+="$prefix'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# Whether --dry-run (DRY_RUN=1) was asked for: print commands, run none.
dry() { [[ "${DRY_RUN:-0}" == 1 ]]; }

# Prints a command ("+ " and the command, quoted), then runs it unless --dry-run.
run() {
  echo "+ $(quote "$@")"
  dry || "$@"
}
