import { launchTestGuest } from '/work/wt-harness/src/harness/test-guest.ts';
const dir = '/tmp/revprof-guest';
const { machine, console: c } = await launchTestGuest(dir, { accel: 'tcg' });
await c.close();
const cp = await machine.checkpoint('clean');
console.log('first checkpoint pause', cp.downtimeMs);
for (let i = 0; i < 6; i++) {
  const t0 = performance.now();
  const marks: string[] = [];
  const r = await machine.revert(cp, { onProgress: (e) => { if (e.type === 'phase') marks.push(`${e.phase}@${(performance.now()-t0).toFixed(0)}`); } });
  console.log(`revert ${r.revertMs.toFixed(0)} restore ${r.restoreMs.toFixed(0)}`, marks.join(' '));
}
const cp2 = await machine.checkpoint('after');
console.log('after-revert checkpoint pause', cp2.downtimeMs);
await machine.close();
