// qsnap's Machine.revert: the harness API. One checkpoint of the bench guest (untimed), then
// reverts to it in a row, each replacing the guest's QEMU in place (lazy: RAM mapped from the
// checkpoint file). Runs after the other paths of a size: a lazily reverted guest's RAM is
// file-backed, which would change what every later snapshot measures.
export async function measureReverts(guest, count) {
  const checkpoint = await guest.machine.checkpoint('bench');
  const revertMs = [];
  for (let i = 0; i < count; i++) revertMs.push((await guest.machine.revert(checkpoint)).revertMs);
  await guest.reconnect();
  const checkOk = await guest.check();
  return { revertMs, checkOk };
}
