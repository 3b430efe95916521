# Sourced by the setup and test scripts.
# On some CI machines /dev/null is a regular file that keeps whatever build scripts write to it, and
# cargo hands /dev/null to rustc as the source of its target probe (`rustc - --print=cfg ...`): the
# probe then fails on that text and cargo caches the failure. Emptying the file before each cargo run
# keeps the probe's input empty; on a real /dev/null this does nothing.
empty_dev_null() {
  if [ -f /dev/null ] && [ -w /dev/null ]; then
    : > /dev/null
  fi
}
