#!/usr/bin/env node
// `make vm` / `make vm-stop`: run the bundled test guest in the background with a known
// QMP socket (<dir>/qmp.sock), for trying qsnap by hand and for `make snapshot`.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { bootTestGuest } from '../dist/guest/test-guest.js';

const [command = 'start', dirArg = '.qsnap/vm'] = process.argv.slice(2);
const dir = resolve(dirArg);
const pidFile = join(dir, 'qemu.pid');

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

if (command === 'start') {
  if (existsSync(pidFile) && alive(Number(readFileSync(pidFile, 'utf8')))) {
    console.log(
      `test guest already running (pid ${readFileSync(pidFile, 'utf8').trim()}), QMP: ${join(dir, 'qmp.sock')}`,
    );
    process.exit(0);
  }
  // A fresh disk per boot: earlier disks may be frozen layers of snapshots and must not change.
  const diskName = `disk-${new Date().toISOString().replace(/[-:]/g, '').replace(/\..*/, '')}.qcow2`;
  const guest = await bootTestGuest({ dir, detached: true, diskName });
  writeFileSync(pidFile, String(guest.vm.pid));
  await guest.console.close();
  await guest.vm.qmp.close();
  console.log(`test guest running: pid ${guest.vm.pid}, booted in ${guest.bootSeconds.toFixed(1)} s`);
  console.log(`  QMP socket     ${guest.vm.qmpPath}`);
  console.log(`  serial console ${guest.vm.serial.socket} (log: ${guest.vm.serial.log})`);
  console.log(`  disk           ${guest.diskFile}`);
  console.log(`try: node dist/cli/main.js status --qmp ${guest.vm.qmpPath}`);
  process.exit(0);
} else if (command === 'stop') {
  if (!existsSync(pidFile)) {
    console.log('no test guest running');
    process.exit(0);
  }
  const pid = Number(readFileSync(pidFile, 'utf8'));
  for (const signal of ['SIGTERM', 'SIGKILL']) {
    if (!alive(pid)) break;
    process.kill(pid, signal);
    for (let i = 0; i < 50 && alive(pid); i++) await new Promise((r) => setTimeout(r, 100));
  }
  await rm(pidFile, { force: true });
  console.log(
    `stopped the test guest (pid ${pid}); its disks and snapshots stay in ${dir} (make clean removes them)`,
  );
} else {
  console.error('usage: vm.mjs start|stop [dir]');
  process.exit(2);
}
