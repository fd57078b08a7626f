# Shared by scripts/test.sh and scripts/package-test.sh (sourced, not run).

# Runs a command as root: directly when we are root, through sudo when it needs no
# password; fails otherwise.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    return 1
  fi
}
