// qsnap's Machine.revert: the harness API. One checkpoint of the bench guest (untimed), then
// reverts to it, each replacing the guest's QEMU in place (lazy: RAM mapped from the checkpoint
// file). As between a harness's tests, the guest runs a moment between reverts (BETWEEN_MS),
// time for the warm spare (the next revert's QEMU, started ahead) to be ready: `revertMs` is
// the revert a test waits for. `backToBackMs` are reverts in a row with no time in between, so
// each one waits for its spare to start (the rate a tight loop of reverts gets).
// Runs after the other paths of a size: a lazily reverted guest's RAM is file-backed, which
// would change what every later snapshot measures.
const BETWEEN_MS = 100;

export async function measureReverts(guest, count) {
  const { machine } = guest;
  const checkpoint = await machine.checkpoint('bench');
  const revertMs = [];
  const warm = [];
  for (let i = 0; i < count; i++) {
    await spareReady(machine);
    await new Promise((r) => setTimeout(r, BETWEEN_MS));
    const r = await machine.revert(checkpoint);
    revertMs.push(r.revertMs);
    warm.push(r.warm);
  }
  const backToBackMs = [];
  for (let i = 0; i < count; i++) backToBackMs.push((await machine.revert(checkpoint)).revertMs);
  await guest.reconnect();
  const checkOk = await guest.check();
  return { revertMs, backToBackMs, warm, checkOk };
}

async function spareReady(machine) {
  const deadline = Date.now() + 30_000;
  while (!machine.spare?.ready && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
}
