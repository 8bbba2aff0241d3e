#!/usr/bin/env bash
# A one-node SLURM on 127.0.0.1 for testing the workflow's SLURM profile (Debian slurm-wlm 22.05 + munge).
#   workflow/slurm/local-cluster.sh start   # installs the packages if needed (root), starts munged, slurmctld, slurmd
#   workflow/slurm/local-cluster.sh stop    # stops exactly the daemons it started (pid files in $STATE)
# The Snakemake SLURM executor strips SLURM_* variables from its job steps, so the config must live at
# /etc/slurm/slurm.conf (recipe and traps: shared/notes/environment-facts.md).
set -euo pipefail
STATE=${SLURM_TEST_STATE:-/tmp/atlantis-slurm}
CPUS=$(nproc)

start() {
  if command -v sinfo >/dev/null && sinfo -h -o %t 2>/dev/null | grep -q idle; then
    echo "a SLURM node is already idle: using it, starting nothing"
    return 0
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$STATE"/{munge,spool/ctld,spool/d,log} /etc/slurm
  chmod 755 "$STATE" "$STATE/munge"
  chown -R munge:munge "$STATE/munge"
  [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c "munged --socket=$STATE/munge/munge.socket --pid-file=$STATE/munge/munged.pid \
    --log-file=$STATE/munge/munged.log --seed-file=$STATE/munge/munged.seed"
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=atlantis-test
SlurmctldHost=localhost(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f /etc/slurm/slurm.conf
  slurmd -f /etc/slurm/slurm.conf -N localhost
  touch "$STATE/started"  # stop only what this script started
  for _ in $(seq 30); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && { echo "SLURM up: $(sinfo -h)"; return 0; }
    sleep 1
  done
  echo "SLURM did not become idle; logs in $STATE/log" >&2
  return 1
}

stop() {
  [ -f "$STATE/started" ] || return 0
  rm -f "$STATE/started"
  for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
}

"${1:?usage: $0 start|stop}"
