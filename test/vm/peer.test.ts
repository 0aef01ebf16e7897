/**
 * Finding the local process behind a QMP endpoint. The parsers are fed /proc text copied from
 * a machine running QEMU; the rest runs against real QEMUs (TCG, no guest, `-S`), listeners of
 * this process, and a process of another user. Every QEMU and child is stopped by pid and every
 * temp directory removed, whatever happened.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, realpathSync } from 'node:fs';
import { mkdir, symlink, unlink } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../src/qmp/index.js';
import { Vm } from '../../src/vm/launcher.js';
import {
  abstractName,
  canonicalIpv6,
  decodeProcAddress,
  findQmpPeer,
  localListenAddresses,
  type PeerResult,
  parseProcCmdline,
  parseProcNetTcp,
  parseProcNetUnix,
  qemuCommandLine,
  tcpListeners,
  unixListeners,
} from '../../src/vm/peer.js';
import { processStartTime } from '../../src/vm/process.js';
import { hasQemu, isRoot, QEMU, ROOT } from '../support/env.js';
import { QemuRegister } from '../support/guest.js';
import { killPid, waitGone, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

/**
 * /proc/net/unix while a QEMU listened on qmp.sock (a client connected: the accepted socket
 * 122920, St 03, prints the same path), on a path with spaces and on an abstract name; then
 * a datagram socket, a SEQPACKET listener, a listener whose path holds a newline, a stream
 * socket bound but not listening, an abstract name with a NUL, an autobound one, and unbound
 * sockets whose inodes the kernel pads to five digits.
 */
const PROC_NET_UNIX = `Num       RefCount Protocol Flags    Type St Inode Path
000000001b43c165: 00000002 00000000 00010000 0001 01 122904 /tmp/peerprobe/qmp.sock
0000000056f6463d: 00000002 00000000 00010000 0001 01 122906 /tmp/peerprobe/with space/s p.sock
000000007e1db23f: 00000003 00000000 00000000 0001 03 122920 /tmp/peerprobe/qmp.sock
0000000065c86140: 00000002 00000000 00010000 0001 01 122907 @qsnapabs
000000000c7a35cc: 00000002 00000000 00000000 0002 01 126615 /tmp/peerprobe/dg.sock
00000000e23a8006: 00000002 00000000 00010000 0005 01 126616 /tmp/peerprobe/sp.sock
000000009931aed8: 00000002 00000000 00010000 0001 01 126617 /tmp/peerprobe/nl
sock
0000000027d41759: 00000002 00000000 00000000 0001 01 126620 /tmp/peerprobe/bound-not-listening.sock
000000009fec32bf: 00000002 00000000 00010000 0001 01 126618 @abs@with-nul
00000000d997bad7: 00000002 00000000 00000000 0001 01 126619 @a006c
0000000006472cac: 00000003 00000000 00000000 0001 03  1074
00000000b0b88650: 00000003 00000000 00000000 0001 03 124027
`;

/** /proc/net/tcp: QEMU on 127.0.0.1:45123 with a client connected (both ends), another listener on 0.0.0.0:2024, a TIME_WAIT row. */
const PROC_NET_TCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
   0: 0100007F:B043 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123952 1 00000000502bb99b 100 0 0 10 0                    
   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 624 1 000000006a365a36 100 0 0 10 0                       
   2: 0100007F:B043 0100007F:AA0A 01 00000000:00000000 00:00000000 00000000     0        0 123029 1 00000000ee18715a 20 0 0 11 -1                    
   3: 0100007F:AA0A 0100007F:B043 01 00000000:00000000 00:00000000 00000000     0        0 124019 2 000000008b98c387 20 4 30 10 -1                   
   4: 0100007F:AA0A 0100007F:B043 06 00000000:00000000 03:00000000 00000000     0        0 0 3 00000000873ec009                                      
`;

/** /proc/net/tcp6: QEMU on [::1]:45124 (a client connected) and on [::]:45125; a v4-mapped connection to a dual-stack listener on 45126. */
const PROC_NET_TCP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:B044 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123951 1 00000000dc663087 100 0 0 10 0
   1: 00000000000000000000000000000000:B045 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123953 1 0000000035e42cfa 100 0 0 10 0
   2: 00000000000000000000000001000000:DF08 00000000000000000000000001000000:B044 01 00000000:00000000 00:00000000 00000000     0        0 124020 2 00000000c8d594e7 20 4 30 10 -1
   3: 00000000000000000000000001000000:B044 00000000000000000000000001000000:DF08 01 00000000:00000000 00:00000000 00000000     0        0 123030 1 00000000cfbb3283 20 0 0 11 -1
   4: 0000000000000000FFFF00000100007F:B046 0000000000000000FFFF00000100007F:A2E4 01 00000000:00000000 00:00000000 00000000     0        0 123560 1 000000008fdb4f04 20 0 0 10 -1
`;

describe('parseProcNetUnix', () => {
  const rows = parseProcNetUnix(PROC_NET_UNIX);

  it('reads every row: the header skipped, padded inodes, unbound sockets without a path', () => {
    expect(rows).toHaveLength(12);
    expect(rows.at(-2)).toEqual({
      inode: 1074,
      flags: 0,
      type: 1,
      state: 3,
      path: undefined,
      listening: false,
    });
    expect(rows.map((r) => r.inode)).toContain(124027);
  });

  it('tells the listener from the accepted socket that prints the same path', () => {
    const onPath = rows.filter((r) => r.path === '/tmp/peerprobe/qmp.sock');
    expect(onPath.map((r) => [r.inode, r.listening])).toEqual([
      [122904, true],
      [122920, false],
    ]);
    expect(unixListeners(rows, ['/tmp/peerprobe/qmp.sock']).map((r) => r.inode)).toEqual([122904]);
  });

  it('keeps spaces and newlines in a path, and abstract names as printed', () => {
    expect(unixListeners(rows, ['/tmp/peerprobe/with space/s p.sock']).map((r) => r.inode)).toEqual([122906]);
    expect(unixListeners(rows, ['/tmp/peerprobe/nl\nsock']).map((r) => r.inode)).toEqual([126617]);
    expect(unixListeners(rows, ['/tmp/peerprobe/nl'])).toEqual([]); // not cut at the newline
    expect(unixListeners(rows, [abstractName('\0qsnapabs')]).map((r) => r.inode)).toEqual([122907]);
    expect(unixListeners(rows, [abstractName('\0abs\0with-nul')]).map((r) => r.inode)).toEqual([126618]);
  });

  it('counts only sockets in listen(2) as listeners: not datagrams, not bound-only sockets', () => {
    expect(rows.filter((r) => r.listening).map((r) => r.inode)).toEqual([
      122904, 122906, 122907, 126616, 126617, 126618,
    ]);
    expect(unixListeners(rows, ['/tmp/peerprobe/dg.sock'])).toEqual([]);
    expect(unixListeners(rows, ['/tmp/peerprobe/bound-not-listening.sock'])).toEqual([]);
    expect(unixListeners(rows, ['/tmp/peerprobe/sp.sock']).map((r) => r.type)).toEqual([5]);
  });

  it('finds every listener bound to a name (two are ambiguous, never one picked)', () => {
    const second = '00000000deadbeef: 00000002 00000000 00010000 0001 01 200000 /tmp/peerprobe/qmp.sock\n';
    const twice = parseProcNetUnix(PROC_NET_UNIX + second);
    expect(unixListeners(twice, ['/tmp/peerprobe/qmp.sock']).map((r) => r.inode)).toEqual([122904, 200000]);
  });
});

describe('parseProcNetTcp', () => {
  const v4 = parseProcNetTcp(PROC_NET_TCP, 'LE');
  const v6 = parseProcNetTcp(PROC_NET_TCP6, 'LE');

  it('reads addresses, ports, states and inodes, TIME_WAIT rows included', () => {
    expect(v4).toHaveLength(5);
    expect(v4[0]).toEqual({
      family: 4,
      address: '127.0.0.1',
      port: 45123,
      state: 0x0a,
      inode: 123952,
      listening: true,
    });
    expect(v4[1]).toMatchObject({ address: '0.0.0.0', port: 2024, listening: true });
    expect(v4[4]).toMatchObject({ state: 6, inode: 0, listening: false });
    expect(v6.map((r) => r.address)).toEqual(['::1', '::', '::1', '::1', '::ffff:7f00:1']);
  });

  it('finds the listener on a port, not the connections on it', () => {
    const rows = [...v4, ...v6];
    expect(tcpListeners(rows, localListenAddresses('127.0.0.1')!, 45123).map((r) => r.inode)).toEqual([
      123952,
    ]);
    expect(tcpListeners(rows, localListenAddresses('::1')!, 45124).map((r) => r.inode)).toEqual([123951]);
    expect(tcpListeners(rows, localListenAddresses('::1')!, 45123)).toEqual([]);
    // A listener on [::] answers 127.0.0.1 as well as ::1 (dual stack).
    expect(tcpListeners(rows, localListenAddresses('127.0.0.1')!, 45125).map((r) => r.inode)).toEqual([
      123953,
    ]);
    expect(tcpListeners(rows, localListenAddresses('localhost')!, 45125).map((r) => r.inode)).toEqual([
      123953,
    ]);
  });

  it('decodes each 32-bit word in the host byte order', () => {
    expect(decodeProcAddress('0100007F', 'LE')).toBe('127.0.0.1');
    expect(decodeProcAddress('7F000001', 'BE')).toBe('127.0.0.1');
    expect(decodeProcAddress('00000000000000000000000001000000', 'LE')).toBe('::1');
    expect(decodeProcAddress('00000000000000000000000000000001', 'BE')).toBe('::1');
    expect(decodeProcAddress('0100007F', 'BE')).toBe('1.0.0.127'); // control: the order matters
  });
});

describe('localListenAddresses', () => {
  it('knows the loopback names, in any spelling', () => {
    expect(localListenAddresses('LOCALHOST')).toEqual(localListenAddresses('localhost'));
    expect(localListenAddresses('0:0:0:0:0:0:0:1')).toEqual(['::1', '::']);
    expect(localListenAddresses('0.0.0.0')).toEqual(localListenAddresses('127.0.0.1'));
    expect(localListenAddresses('127.0.0.1')).toContain(canonicalIpv6('::ffff:127.0.0.1'));
  });

  it('is undefined for anything else', () => {
    for (const host of ['192.0.2.1', '127.0.0.2', 'example.com', 'fd00::2']) {
      expect(localListenAddresses(host), host).toBeUndefined();
    }
  });
});

describe('parseProcCmdline', () => {
  it('splits on NUL, keeps empty arguments, drops only the terminator', () => {
    expect(parseProcCmdline('qemu-system-x86_64\0-name\0\0-S\0')).toEqual([
      'qemu-system-x86_64',
      '-name',
      '',
      '-S',
    ]);
    expect(parseProcCmdline('a title set by the process')).toEqual(['a title set by the process']);
    expect(parseProcCmdline('')).toEqual([]);
  });
});

describe('qemuCommandLine', () => {
  const control = [
    '-chardev',
    'socket,id=qsnap-control,path=/run/x/control.sock,server=on,wait=off',
    '-mon',
    'chardev=qsnap-control,mode=control',
  ];
  const user = ['-accel', 'tcg', '-m', '64', '-S', '-qmp', 'unix:/run/x/qmp.sock,server=on,wait=off'];

  it('drops qsnap-control and keeps everything else verbatim, the binary first', () => {
    expect(qemuCommandLine(['/usr/bin/qemu-system-x86_64', ...user, ...control])).toEqual([
      '/usr/bin/qemu-system-x86_64',
      ...user,
    ]);
    expect(qemuCommandLine([...control, ...user])).toEqual(user);
  });

  it('keeps a command line without it as it is (control)', () => {
    expect(qemuCommandLine(['qemu', ...user])).toEqual(['qemu', ...user]);
  });

  it('reads options, not words: --chardev too, other ids and values that look alike stay', () => {
    const argv = [
      'qemu',
      '--chardev',
      'socket,id=qsnap-control,path=/a,,b.sock,server=on',
      '-chardev',
      'socket,id=qsnap-control2,path=/c.sock,server=on',
      '-name',
      'chardev=qsnap-control,mode=control',
      '--mon',
      'qsnap-control',
      '-nodefaults',
    ];
    expect(qemuCommandLine(argv)).toEqual([
      'qemu',
      '-chardev',
      'socket,id=qsnap-control2,path=/c.sock,server=on',
      '-name',
      'chardev=qsnap-control,mode=control',
      '-nodefaults',
    ]);
  });
});

const VITE_NODE = join(ROOT, 'node_modules', '.bin', 'vite-node');
const FIND_PEER = join(ROOT, 'test', 'vm', 'fixtures', 'find-peer.ts');
const BARE = ['-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-S'];

/** Polls until something answers `endpoint`, then returns what findQmpPeer says. */
async function peerOnceListening(endpoint: string): Promise<PeerResult> {
  await waitUntil(async () => (await findQmpPeer(endpoint)).found, 15_000, `a listener on ${endpoint}`);
  return findQmpPeer(endpoint);
}

/** A TCP port nothing listens on right now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
  const { port } = server.address() as { port: number };
  await new Promise((ok) => server.close(ok));
  return port;
}

async function listen(server: Server, where: string | { host: string; port: number }): Promise<Server> {
  await new Promise<void>((ok, fail) => {
    server.once('error', fail);
    if (typeof where === 'string') server.listen(where, ok);
    else server.listen(where.port, where.host, ok);
  });
  return server;
}

describe.skipIf(!hasQemu)('findQmpPeer on real processes', () => {
  const qemus = new QemuRegister();
  const servers = new Set<Server>();
  const children = new Set<ChildProcess>();
  let sandbox: Sandbox;
  let qemuExe: string;

  beforeAll(async () => {
    sandbox = await openSandbox('peer');
    qemuExe = realpathSync(execFileSync('sh', ['-c', `command -v ${QEMU}`], { encoding: 'utf8' }).trim());
  });

  afterEach(async () => {
    await qemus.stopAll();
    for (const child of children) await killPid(child.pid);
    children.clear();
    for (const server of servers) await new Promise((ok) => server.close(ok));
    servers.clear();
  });

  afterAll(async () => {
    await sandbox?.dispose();
  });

  function startQemu(args: string[]): ChildProcess {
    const child = spawn(QEMU, args, { stdio: 'ignore' });
    qemus.add(child.pid!);
    return child;
  }

  function server(): Server {
    const s = createServer((socket) => socket.destroy());
    servers.add(s);
    return s;
  }

  it('finds the QEMU on a unix socket: its pid, start time, binary and argv as spawned', async () => {
    const qmp = join(sandbox.root, 'qmp.sock');
    const args = [...BARE, '-qmp', `unix:${qmp},server=on,wait=off`];
    const child = startQemu(args);
    const peer = await peerOnceListening(qmp);
    expect(peer).toEqual({
      found: true,
      pid: child.pid,
      startTime: processStartTime(child.pid!),
      argv: [QEMU, ...args],
      exe: qemuExe,
    });
    // A connected client adds an accepted socket on the same path; the listener is still the one.
    const client = await QmpClient.connect(qmp);
    try {
      expect(await findQmpPeer(`unix:${qmp}`)).toEqual(peer);
    } finally {
      await client.close();
    }
  });

  it('finds the QEMU on a TCP port by 127.0.0.1, localhost and tcp:, but not on ::1 (control)', async () => {
    const port = await freePort();
    const args = [...BARE, '-qmp', `tcp:127.0.0.1:${port},server=on,wait=off`];
    const child = startQemu(args);
    const peer = await peerOnceListening(`127.0.0.1:${port}`);
    expect(peer).toMatchObject({ found: true, pid: child.pid, argv: [QEMU, ...args], exe: qemuExe });
    expect(await findQmpPeer(`localhost:${port}`)).toEqual(peer);
    expect(await findQmpPeer(`tcp:127.0.0.1:${port}`)).toEqual(peer);
    expect(await findQmpPeer(`[::1]:${port}`)).toMatchObject({ found: false, reason: 'no-listener' });
  });

  it('resolves symlinks on either side and keeps spaces in the path', async () => {
    const real = join(sandbox.root, 'with space');
    const link = join(sandbox.root, 'link');
    await mkdir(real);
    await symlink(real, link);
    const args = [...BARE, '-qmp', `unix:${link}/qmp.sock,server=on,wait=off`]; // bound through the link
    const child = startQemu(args);
    const peer = await peerOnceListening(join(real, 'qmp.sock'));
    expect(peer).toMatchObject({ found: true, pid: child.pid, argv: [QEMU, ...args] });
    expect(await findQmpPeer(join(link, 'qmp.sock'))).toEqual(peer);
  });

  it('gives the argv of a QEMU from Vm.launchArgv, and without qsnap-control the argv it was given', async () => {
    const runDir = join(sandbox.root, 'run');
    const qmpPath = join(runDir, 'qmp.sock');
    const argv = [...BARE, '-qmp', `unix:${qmpPath},server=on,wait=off`];
    const vm = qemus.add(await Vm.launchArgv(argv, { qmpPath, runDir, ownsRunDir: true }));
    const peer = await findQmpPeer(qmpPath);
    expect(peer).toMatchObject({ found: true, pid: vm.pid, argv: [QEMU, ...vm.fullArgv] });
    if (!peer.found) return;
    expect(peer.argv.join(' ')).toContain('qsnap-control'); // control: there is something to drop
    expect(qemuCommandLine(peer.argv)).toEqual([QEMU, ...argv]);
    // The private control socket is that QEMU's too.
    expect(await findQmpPeer(vm.controlPath)).toEqual(peer);
  });

  it('finds this process behind its own unix listener, and no one behind a path nobody listens on', async () => {
    const path = join(sandbox.root, 'node.sock');
    await listen(server(), path);
    expect(await findQmpPeer(path)).toMatchObject({
      found: true,
      pid: process.pid,
      startTime: processStartTime(process.pid),
      exe: realpathSync(process.execPath),
    });
    const nobody = join(sandbox.root, 'nobody.sock');
    expect(await findQmpPeer(nobody)).toMatchObject({ found: false, reason: 'no-listener' });
  });

  it('finds no listener on the socket file a killed QEMU left behind', async () => {
    const qmp = join(sandbox.root, 'killed.sock');
    const child = startQemu([...BARE, '-qmp', `unix:${qmp},server=on,wait=off`]);
    expect(await peerOnceListening(qmp)).toMatchObject({ found: true, pid: child.pid }); // control
    process.kill(child.pid!, 'SIGKILL');
    expect(await waitGone(child.pid!)).toBe(true);
    expect(existsSync(qmp)).toBe(true); // the file is there, nobody serves it
    // The kernel drops the dead process's listener a moment after the process is reaped.
    await waitUntil(
      async () => {
        const peer = await findQmpPeer(qmp);
        return !peer.found && peer.reason === 'no-listener';
      },
      5000,
      'the listener to go',
    );
  });

  it('cannot place a QEMU bound to a relative path, and says so', async () => {
    const dir = join(sandbox.root, 'relative');
    await mkdir(dir);
    const child = spawn(QEMU, [...BARE, '-qmp', 'unix:rel.sock,server=on,wait=off'], {
      cwd: dir,
      stdio: 'ignore',
    });
    qemus.add(child.pid!);
    const detail = async () => {
      const peer = await findQmpPeer(join(dir, 'rel.sock'));
      expect(peer).toMatchObject({ found: false, reason: 'no-listener' });
      return peer.found ? '' : peer.detail;
    };
    // bind(2) makes the file before listen(2): wait for the listener, not the file.
    await waitUntil(async () => (await detail()).includes('relative path rel.sock'), 15_000, 'the listener');
  });

  it('calls a remote host not local, before reading anything', async () => {
    expect(await findQmpPeer('192.0.2.1:4444')).toMatchObject({ found: false, reason: 'not-local' });
    expect(await findQmpPeer('tcp:example.com:4444')).toMatchObject({ found: false, reason: 'not-local' });
  });

  it('is ambiguous while a second process holds the same listener, and never picks one', async () => {
    const path = join(sandbox.root, 'shared.sock');
    const shared = await listen(server(), path);
    expect(await findQmpPeer(path)).toMatchObject({ found: true, pid: process.pid }); // control
    const child = spawn(process.execPath, ['-e', HOLDER], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    children.add(child);
    const held = new Promise((ok) => child.once('message', ok));
    child.send('hold', shared);
    await held;
    const peer = await findQmpPeer(path);
    expect(peer).toMatchObject({ found: false, reason: 'ambiguous' });
    expect(peer.found ? '' : peer.detail).toContain(`${child.pid}`);
    await killPid(child.pid);
    expect(await findQmpPeer(path)).toMatchObject({ found: true, pid: process.pid });
  });

  it('is ambiguous when a path was unlinked and bound again (two listeners print it)', async () => {
    const path = join(sandbox.root, 'rebound.sock');
    await listen(server(), path);
    expect(await findQmpPeer(path)).toMatchObject({ found: true, pid: process.pid }); // control
    await unlink(path);
    await listen(server(), path);
    expect(await findQmpPeer(path)).toMatchObject({ found: false, reason: 'ambiguous' });
  });

  it.skipIf(!isRoot)(
    "is not readable by a user who may not read the holder's fd table (run as nobody)",
    async () => {
      const s = await listen(server(), { host: '127.0.0.1', port: 0 });
      const endpoint = `127.0.0.1:${(s.address() as { port: number }).port}`;
      expect(await findQmpPeer(endpoint)).toMatchObject({ found: true, pid: process.pid }); // control
      const out = execFileSync(VITE_NODE, [FIND_PEER, endpoint], {
        cwd: '/',
        uid: 65534,
        gid: 65534,
        encoding: 'utf8',
      });
      expect(JSON.parse(out)).toMatchObject({ found: false, reason: 'not-readable' });
    },
  );
});

/** A child that keeps the listening socket its parent sends it, and says so. */
const HOLDER = `process.on('message', (_m, handle) => { globalThis.held = handle; process.send('held'); });`;
