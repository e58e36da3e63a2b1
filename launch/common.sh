# Shell helpers shared by the launch scripts (sourced, not run).
# shellcheck shell=bash

# Prints the calling script's header comment (from line 2 to `set -euo pipefail`) as usage.
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

# Sets the variable a long option names to a value: set_option --data-dir DIR sets DATA_DIR.
set_option() {
  local var
  var="$(printf '%s' "${1#--}" | tr 'a-z-' 'A-Z_')"
  printf -v "$var" '%s' "$2"
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
