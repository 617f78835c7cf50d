# Shared by the scripts that start their own redis-server. Source it: `. scripts/lib.sh`.

# Prints a free loopback port (one nothing accepts a connection on), or fails.
free_port() {
  local candidate
  for _ in $(seq 1 100); do
    candidate=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no free port" >&2
  return 1
}
