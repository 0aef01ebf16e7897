/**
 * Pre-faulting file-backed guest RAM (engine/snapshot/prefault.ts): the /proc/<pid>/maps lines
 * it picks, and on a real QEMU whose RAM is a private mapping of a file that nothing touched
 * yet (-S: the guest never ran), that the kernel has mapped the file's pages into QEMU once it
 * ran — the resident size of the mapping, before (the control: next to nothing) and after.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mappingsOf, prefaultMappings } from '../../src/engine/snapshot/prefault.js';
import { Vm } from '../../src/vm/launcher.js';
import { hasQemu, QEMU } from '../support/env.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe('mappingsOf', () => {
  const maps = [
    '55d1c0a00000-55d1c0b00000 r--p 00000000 fd:01 1234                       /usr/bin/qemu-system-x86_64',
    '7f0000000000-7f0004000000 rw-p 00000000 00:1a 77                         /dev/shm/m-x/cp 1.qsnap',
    '7f0004000000-7f0004200000 rw-p 00000000 00:00 0 ',
    '7f0005000000-7f0005001000 rw-p 04000000 00:1a 77                         /dev/shm/m-x/cp 1.qsnap',
    '7f0006000000-7f0006001000 rw-p 00000000 00:1a 78                         /dev/shm/m-x/cp 1.qsnap.old',
  ].join('\n');

  it('picks the lines that map one of the files, by the whole path (spaces and all)', () => {
    expect(mappingsOf(maps, ['/dev/shm/m-x/cp 1.qsnap'])).toEqual([
      { start: 0x7f0000000000, end: 0x7f0004000000 },
      { start: 0x7f0005000000, end: 0x7f0005001000 },
    ]);
    expect(mappingsOf(maps, ['/dev/shm/m-x/cp'])).toEqual([]);
    expect(mappingsOf('', ['/x'])).toEqual([]);
  });
});

describe.skipIf(!hasQemu)('prefaultMappings on a QEMU', () => {
  let sandbox: Sandbox;
  let vm: Vm | undefined;
  let ramFile = '';

  beforeAll(async () => {
    sandbox = await openSandbox('prefault');
    ramFile = join('/dev/shm', `qsnap-prefault-${process.pid}`);
    execFileSync('truncate', ['-s', '64M', ramFile]);
    vm = await Vm.launchArgv(
      [
        ...['-machine', 'pc,memory-backend=ram0', '-accel', 'tcg', '-m', '64M', '-S'],
        ...['-object', `memory-backend-file,id=ram0,size=64M,mem-path=${ramFile},share=off`],
        ...['-display', 'none', '-nodefaults'],
        ...['-qmp', `unix:${join(sandbox.tmp, 'qmp.sock')},server=on,wait=off`],
      ],
      { qemuBinary: QEMU, runDir: sandbox.tmp, qmpPath: join(sandbox.tmp, 'qmp.sock') },
    );
  });

  afterAll(async () => {
    await vm?.stop({ timeoutMs: 3000 }).catch(() => vm?.kill());
    execFileSync('rm', ['-f', ramFile]);
    await sandbox?.dispose();
  });

  /** Resident KiB of QEMU's mappings of the RAM file (smaps). */
  function residentKiB(): number {
    let kib = 0;
    let inRam = false;
    for (const line of readFileSync(`/proc/${vm!.pid}/smaps`, 'utf8').split('\n')) {
      if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) inRam = line.endsWith(ramFile);
      else if (inRam && line.startsWith('Rss:')) kib += Number(/(\d+) kB/.exec(line)![1]);
    }
    return kib;
  }

  it('maps every untouched page of the file into QEMU, holes of a sparse file too', async () => {
    const before = residentKiB();
    expect(before, 'the control: RAM nothing touched yet is not mapped').toBeLessThan(16 * 1024);
    const done = await prefaultMappings(vm!.pid, [ramFile]);
    expect(done?.bytes).toBe(64 * 2 ** 20);
    expect(residentKiB(), 'mapped once read').toBeGreaterThan(60 * 1024);
  });

  it('does nothing for a file QEMU does not map', async () => {
    expect(await prefaultMappings(vm!.pid, ['/dev/shm/nothing-maps-this'])).toBeUndefined();
  });
});
