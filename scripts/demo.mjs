#!/usr/bin/env node
// `make demo`: the main job end to end on the bundled test guest, through the real CLI:
// boot the guest (its workload keeps rewriting memory and disk), snapshot it live, verify
// the file, restore it (lazy and full) into new QEMUs, and have the workload check that
// memory and disk are exactly one instant's.
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { GuestConsole } from '../dist/guest/console.js';
import { bootTestGuest } from '../dist/guest/test-guest.js';

const root = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..');
const dir = join(root, '.qsnap', 'demo');
const cli = join(root, 'dist', 'cli', 'main.js');
const pids = [];
const runDirs = [];

function step(text) {
  console.log(`\n\x1b[1m== ${text}\x1b[0m`);
}

function qsnap(args, { json = false } = {}) {
  console.log(`$ qsnap ${args.map((a) => (/[\s"]/.test(a) ? JSON.stringify(a) : a)).join(' ')}`);
  const result = spawnSync(process.execPath, [cli, ...args], {
    stdio: json ? ['ignore', 'pipe', 'inherit'] : 'inherit',
    encoding: 'utf8',
  });
  if (result.status !== 0) throw new Error(`qsnap ${args[0]} failed (exit ${result.status})`);
  if (json) {
    const value = JSON.parse(result.stdout);
    console.log(JSON.stringify(value, null, 2));
    return value;
  }
  return undefined;
}

async function checkGuest(serialSocket, label) {
  const guestConsole = await GuestConsole.connect(serialSocket);
  try {
    const heartbeat = await guestConsole.nextHeartbeat({ timeoutMs: 15_000 });
    const result = await guestConsole.check();
    console.log(
      `${label}: workload ${heartbeat.memMibps} MiB/s memory, ${heartbeat.diskIops} disk writes/s; ${result.line}`,
    );
    if (!result.ok) throw new Error(`${label}: the restored guest is not consistent`);
  } finally {
    await guestConsole.close();
  }
}

function killPid(pid) {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone
  }
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(dir, { recursive: true });
let guest;
try {
  step('Boot the test guest (TCG) — its workload rewrites 64 MiB of memory and a disk ring at full speed');
  guest = await bootTestGuest({ dir: join(dir, 'vm') });
  console.log(`booted in ${guest.bootSeconds.toFixed(1)} s; QMP socket ${guest.vm.qmpPath}`);
  const heartbeat = await guest.console.nextHeartbeat({ timeoutMs: 15_000 });
  console.log(heartbeat.line);

  step('Status of the running VM');
  qsnap(['status', '--qmp', guest.vm.qmpPath]);

  step('Live snapshot while the workload runs');
  const snapshotFile = join(dir, 'demo.qsnap');
  qsnap(['snapshot', '--qmp', guest.vm.qmpPath, '--out', snapshotFile]);
  const live = await guest.console.check();
  console.log(`the original guest kept running: ${live.line}`);

  step('Verify every checksum of the snapshot file');
  qsnap(['verify', snapshotFile]);

  // The restored QEMU reuses the command line, hence the same socket paths: stop the original.
  const argv = ['qemu-system-x86_64', ...guest.argv];
  const serial = guest.vm.serial.socket;
  await guest.console.close();
  await guest.vm.stop();

  for (const mode of ['--lazy', '--full']) {
    step(`Restore (${mode.slice(2)}) into a new QEMU and check the workload's point-in-time invariant`);
    const result = qsnap(
      ['restore', snapshotFile, ...(mode === '--lazy' ? ['--lazy'] : []), '--json', '--', ...argv],
      { json: true },
    );
    pids.push(result.pid);
    runDirs.push(result.runDir);
    await checkGuest(serial, `${mode.slice(2)} restore`);
    killPid(result.pid);
  }
  step('Done: snapshot → restore → check OK');
} catch (err) {
  console.error(`demo failed: ${err.message}`);
  process.exitCode = 1;
} finally {
  for (const pid of pids) killPid(pid);
  for (const runDir of runDirs) rmSync(runDir, { recursive: true, force: true });
  await guest?.stop().catch(() => undefined);
  rmSync(dir, { recursive: true, force: true });
}
