/**
 * parseCommandLine / rewriteCommandLine: the VM's own command line in, the restoring command
 * line out. Pure functions, so every fixture is a literal argv and every expectation the exact
 * argv QEMU would get.
 */
import { describe, expect, it } from 'vitest';
import { refuseUnsafeLazy } from '../../src/engine/restore/lazy.js';
import {
  type ArgvDisk,
  type ParsedCommandLine,
  parseCommandLine,
  parseRamSize,
} from '../../src/vm/cmdline.js';
import { rewriteCommandLine } from '../../src/vm/cmdline-rewrite.js';

const OVERLAY = '/ovl/disk.restore-0badcafe.qcow2';
const SNAPSHOT = '/snaps/vm.qsnap';
const RAM = 256 * 2 ** 20;

/** Every writable disk of the command line onto OVERLAY (restore does this per snapshot disk). */
function rewriteDisks(
  parsed: ParsedCommandLine,
  extra: Parameters<typeof rewriteCommandLine>[1] = { disks: [] },
) {
  return rewriteCommandLine(parsed, {
    ...extra,
    disks: parsed.disks.filter((d) => !d.readOnly).map((argvDisk) => ({ argvDisk, overlayFile: OVERLAY })),
  });
}

function onlyDisk(parsed: ParsedCommandLine): ArgvDisk {
  expect(parsed.disks).toHaveLength(1);
  return parsed.disks[0]!;
}

describe('parseCommandLine: disks', () => {
  it('-drive with id, if and format', () => {
    const parsed = parseCommandLine([
      'qemu-system-x86_64',
      '-m',
      '1G',
      '-drive',
      'file=/img/vm.qcow2,if=virtio,format=qcow2,id=hd0,cache=none',
    ]);
    expect(parsed.binary).toBe('qemu-system-x86_64');
    expect(onlyDisk(parsed)).toEqual({
      entryIndex: 1,
      kind: 'drive',
      file: '/img/vm.qcow2',
      nodeName: 'hd0',
      formatEntryIndex: undefined,
      readOnly: false,
      deviceId: undefined,
    });
    expect(rewriteDisks(parsed)).toEqual([
      '-m',
      '1G',
      '-drive',
      `if=virtio,id=hd0,cache=none,file=${OVERLAY},format=qcow2`,
      '-incoming',
      'defer',
    ]);
  });

  it('-drive if=none with the device that names it', () => {
    const parsed = parseCommandLine([
      '-drive',
      'if=none,id=drive0,file=/img/vm.raw,format=raw',
      '-device',
      'virtio-blk-pci,drive=drive0,id=vblk0',
    ]);
    expect(onlyDisk(parsed)).toMatchObject({ file: '/img/vm.raw', nodeName: 'drive0', deviceId: 'vblk0' });
    // The overlay is qcow2 whatever the frozen layer was (its header names the raw backing file).
    expect(rewriteDisks(parsed)[1]).toBe(`if=none,id=drive0,file=${OVERLAY},format=qcow2`);
  });

  it('-blockdev file node + format node: the file node gets the overlay, the format node becomes qcow2', () => {
    const parsed = parseCommandLine([
      '-blockdev',
      'driver=file,filename=/img/vm.raw,node-name=disk0-file',
      '-blockdev',
      'driver=raw,file=disk0-file,node-name=disk0,offset=0,size=1073741824',
      '-device',
      'virtio-blk-pci,drive=disk0,id=disk0-dev',
    ]);
    expect(onlyDisk(parsed)).toEqual({
      entryIndex: 0,
      kind: 'blockdev-file',
      file: '/img/vm.raw',
      nodeName: 'disk0',
      formatEntryIndex: 1,
      readOnly: false,
      deviceId: 'disk0-dev',
    });
    expect(rewriteDisks(parsed)).toEqual([
      '-blockdev',
      `driver=file,node-name=disk0-file,filename=${OVERLAY}`,
      '-blockdev',
      // offset/size described the raw image; backing comes from the overlay's header.
      'file=disk0-file,node-name=disk0,driver=qcow2',
      '-device',
      'virtio-blk-pci,drive=disk0,id=disk0-dev',
      '-incoming',
      'defer',
    ]);
  });

  it('-blockdev with a nested file.filename', () => {
    const parsed = parseCommandLine([
      '-blockdev',
      'driver=qcow2,file.driver=file,file.filename=/img/vm.qcow2,node-name=d1,backing=base0',
      '-device',
      'virtio-blk-pci,drive=d1,id=vd1',
    ]);
    expect(onlyDisk(parsed)).toMatchObject({
      kind: 'blockdev-file',
      file: '/img/vm.qcow2',
      nodeName: 'd1',
      formatEntryIndex: 0,
      deviceId: 'vd1',
    });
    expect(rewriteDisks(parsed)[1]).toBe(
      `file.driver=file,node-name=d1,file.filename=${OVERLAY},driver=qcow2`,
    );
  });

  it('JSON -blockdev with a nested file object', () => {
    const parsed = parseCommandLine([
      '-blockdev',
      '{"driver":"raw","node-name":"d2","offset":0,"file":{"driver":"file","filename":"/img/j.raw"}}',
      '-device',
      'virtio-blk-pci,drive=d2,id=vd2',
    ]);
    expect(onlyDisk(parsed)).toMatchObject({
      kind: 'blockdev-json',
      file: '/img/j.raw',
      nodeName: 'd2',
      deviceId: 'vd2',
    });
    const out = rewriteDisks(parsed);
    expect(JSON.parse(out[1]!)).toEqual({
      driver: 'qcow2',
      'node-name': 'd2',
      file: { driver: 'file', filename: OVERLAY },
    });
  });

  it('JSON -blockdev file node + JSON format node: both rewritten, the device found', () => {
    const parsed = parseCommandLine([
      '-blockdev',
      '{"driver":"file","filename":"/img/p.raw","node-name":"f3"}',
      '-blockdev',
      '{"driver":"raw","file":"f3","node-name":"d3"}',
      '-device',
      'virtio-blk-pci,drive=d3,id=vd3',
    ]);
    expect(onlyDisk(parsed)).toMatchObject({
      kind: 'blockdev-json',
      file: '/img/p.raw',
      nodeName: 'd3',
      formatEntryIndex: 1,
      deviceId: 'vd3',
    });
    const out = rewriteDisks(parsed);
    expect(JSON.parse(out[1]!)).toEqual({ driver: 'file', filename: OVERLAY, 'node-name': 'f3' });
    // A raw format node left over a qcow2 overlay would show the guest qcow2 metadata as its disk.
    expect(JSON.parse(out[3]!)).toEqual({ driver: 'qcow2', file: 'f3', 'node-name': 'd3' });
  });

  it('-hda becomes a -drive entry and is rewritten like one', () => {
    const parsed = parseCommandLine(['-hda', '/img/h.qcow2', '-m', '256']);
    expect(onlyDisk(parsed)).toMatchObject({ kind: 'drive', file: '/img/h.qcow2', readOnly: false });
    expect(rewriteDisks(parsed)).toEqual([
      '-drive',
      `index=0,media=disk,file=${OVERLAY},format=qcow2`,
      '-m',
      '256',
      '-incoming',
      'defer',
    ]);
  });

  it('read-only drives and cdroms are left alone', () => {
    const argv = [
      '-drive',
      'file=/img/ro.qcow2,if=virtio,readonly=on',
      '-blockdev',
      'driver=file,filename=/img/base.raw,node-name=b-file,read-only=on',
      '-blockdev',
      'driver=raw,file=b-file,node-name=b',
      '-drive',
      'file=/img/install.iso,media=cdrom',
      '-cdrom',
      '/img/other.iso',
    ];
    const parsed = parseCommandLine(argv);
    expect(parsed.disks.map((d) => [d.file, d.readOnly])).toEqual([
      ['/img/ro.qcow2', true],
      ['/img/base.raw', true],
    ]);
    expect(rewriteDisks(parsed)).toEqual([...argv, '-incoming', 'defer']);
  });

  it('commas in paths are escaped QEMU-style (,,) in option strings, not in JSON', () => {
    const parsed = parseCommandLine(['-drive', 'file=/img/a,,b.qcow2,if=virtio']);
    expect(onlyDisk(parsed).file).toBe('/img/a,b.qcow2');
    const out = rewriteCommandLine(parsed, {
      disks: [{ argvDisk: parsed.disks[0]!, overlayFile: '/ovl/x,y.qcow2' }],
      qmpSocket: '/run/q,1.sock',
      lazy: { file: '/snaps/s,1.qsnap', blockName: 'pc.ram', ramBytes: RAM },
    });
    expect(out).toEqual([
      '-drive',
      'if=virtio,file=/ovl/x,,y.qcow2,format=qcow2',
      '-object',
      `memory-backend-file,id=pc.ram,size=${RAM},mem-path=/snaps/s,,1.qsnap,share=off`,
      '-machine',
      'memory-backend=pc.ram',
      '-qmp',
      'unix:/run/q,,1.sock,server=on,wait=off',
      '-incoming',
      'defer',
    ]);
    const json = parseCommandLine([
      '-blockdev',
      '{"driver":"file","filename":"/img/c,d.raw","node-name":"f"}',
    ]);
    expect(
      JSON.parse(
        rewriteCommandLine(json, { disks: [{ argvDisk: json.disks[0]!, overlayFile: '/ovl/e,f' }] })[1]!,
      ),
    ).toMatchObject({ filename: '/ovl/e,f' });
  });
});

describe('parseCommandLine: control socket, devices, memory', () => {
  it('-qmp unix: is the QMP socket; restore adds none then', () => {
    const parsed = parseCommandLine(['-qmp', 'unix:/run/vm.sock,server=on,wait=off']);
    expect(parsed.qmpSocket).toBe('/run/vm.sock');
    expect(rewriteCommandLine(parsed, { disks: [], qmpSocket: '/run/other.sock' })).toEqual([
      '-qmp',
      'unix:/run/vm.sock,server=on,wait=off',
      '-incoming',
      'defer',
    ]);
  });

  it('-chardev socket server + -mon mode=control is the QMP socket', () => {
    const parsed = parseCommandLine([
      '-chardev',
      'socket,id=mon0,path=/run/m.sock,server=on,wait=off',
      '-mon',
      'chardev=mon0,mode=control',
    ]);
    expect(parsed.qmpSocket).toBe('/run/m.sock');
  });

  it('a human monitor or a client chardev is not a QMP socket; restore adds one', () => {
    const parsed = parseCommandLine([
      '-chardev',
      'socket,id=hmp,path=/run/h.sock,server=on,wait=off',
      '-mon',
      'chardev=hmp,mode=readline',
      '-chardev',
      'socket,id=c,path=/run/c.sock',
      '-mon',
      'chardev=c,mode=control',
    ]);
    expect(parsed.qmpSocket).toBeUndefined();
    expect(rewriteCommandLine(parsed, { disks: [], qmpSocket: '/run/new.sock' }).slice(-4)).toEqual([
      '-qmp',
      'unix:/run/new.sock,server=on,wait=off',
      '-incoming',
      'defer',
    ]);
  });

  it('-incoming and -daemonize are removed; -incoming defer is added once', () => {
    const parsed = parseCommandLine(['-daemonize', '-incoming', 'tcp:0:4444', '-S', '-m', '512M']);
    expect(rewriteCommandLine(parsed, { disks: [] })).toEqual(['-S', '-m', '512M', '-incoming', 'defer']);
  });

  it('--double-dash options are the same options', () => {
    const parsed = parseCommandLine(['--drive', 'file=/img/v.qcow2', '--qmp', 'unix:/run/q.sock,server=on']);
    expect(parsed.qmpSocket).toBe('/run/q.sock');
    expect(onlyDisk(parsed).file).toBe('/img/v.qcow2');
  });

  it('-device types are collected (lazy refuses RAM-discarding devices)', () => {
    const parsed = parseCommandLine([
      '-device',
      'virtio-balloon-pci,id=b0',
      '-device',
      'driver=virtio-rng-pci',
    ]);
    expect(parsed.deviceTypes).toEqual(['virtio-balloon-pci', 'virtio-rng-pci']);
    expect(() => refuseUnsafeLazy(parsed, [])).toThrow(
      expect.objectContaining({ code: 'QSNAP_RESTORE_LAZY_UNSAFE' }),
    );
    expect(() => refuseUnsafeLazy(parseCommandLine([]), ['virtio-mem-pci'])).toThrow(
      expect.objectContaining({ code: 'QSNAP_RESTORE_LAZY_UNSAFE' }),
    );
    expect(() =>
      refuseUnsafeLazy(parseCommandLine(['-device', 'virtio-rng-pci']), ['0000:00:02.0/vga']),
    ).not.toThrow();
  });

  it('-m sizes: plain MiB, suffixes, size=', () => {
    expect(parseCommandLine(['-m', '256']).ramBytes).toBe(256 * 2 ** 20);
    expect(parseCommandLine(['-m', '256M']).ramBytes).toBe(256 * 2 ** 20);
    expect(parseCommandLine(['-m', '2G']).ramBytes).toBe(2 * 2 ** 30);
    expect(parseCommandLine(['-m', 'size=1.5G,slots=2,maxmem=4G']).ramBytes).toBe(1.5 * 2 ** 30);
    expect(parseCommandLine(['-m', '524288k']).ramBytes).toBe(512 * 2 ** 20);
    expect(parseCommandLine([]).ramBytes).toBeUndefined();
    expect(parseRamSize('lots')).toBeUndefined();
  });
});

describe('rewriteCommandLine: lazy RAM', () => {
  const lazy = { file: SNAPSHOT, blockName: 'pc.ram', ramBytes: RAM };

  it('no -machine: a private file backend and -machine memory-backend= are added', () => {
    const parsed = parseCommandLine(['-m', '256M']);
    expect(rewriteCommandLine(parsed, { disks: [], lazy })).toEqual([
      '-m',
      '256M',
      '-object',
      `memory-backend-file,id=pc.ram,size=${RAM},mem-path=${SNAPSHOT},share=off`,
      '-machine',
      'memory-backend=pc.ram',
      '-incoming',
      'defer',
    ]);
  });

  it('an existing -machine gets memory-backend= added to it', () => {
    const parsed = parseCommandLine(['-machine', 'pc,accel=tcg', '-m', '256M']);
    expect(rewriteCommandLine(parsed, { disks: [], lazy })).toEqual([
      '-machine',
      'pc,accel=tcg,memory-backend=pc.ram',
      '-m',
      '256M',
      '-object',
      `memory-backend-file,id=pc.ram,size=${RAM},mem-path=${SNAPSHOT},share=off`,
      '-incoming',
      'defer',
    ]);
  });

  it("the VM's own memory backend is replaced by the snapshot mapping, keeping its id", () => {
    const parsed = parseCommandLine([
      '-object',
      'memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/guest-ram,share=on',
      '-machine',
      'pc,memory-backend=mem0',
      '-object',
      'memory-backend-ram,id=unrelated,size=16M',
      '-m',
      '256M',
    ]);
    expect(parsed.memoryBackendId).toBe('mem0');
    expect(rewriteCommandLine(parsed, { disks: [], lazy })).toEqual([
      '-machine',
      'pc,memory-backend=mem0',
      '-object',
      'memory-backend-ram,id=unrelated,size=16M',
      '-m',
      '256M',
      '-object',
      `memory-backend-file,id=mem0,size=${RAM},mem-path=${SNAPSHOT},share=off`,
      '-incoming',
      'defer',
    ]);
  });

  it('-M is a -machine', () => {
    const parsed = parseCommandLine(['-M', 'q35']);
    expect(rewriteCommandLine(parsed, { disks: [], lazy })[1]).toBe('q35,memory-backend=pc.ram');
  });
});
