// The qsnap dashboard: one WebSocket to the daemon (the session cookie the page came with
// authenticates it; no token in any URL), subscribed to every VM. Plain JS, no build step.
const state = { vms: new Map(), ops: new Map(), snapshots: [], restores: [] };
let ws;
let seq = 0;
const pending = new Map();

function request(op, args = {}) {
  const id = `d${++seq}`;
  ws.send(JSON.stringify({ v: 1, id, op, args }));
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

function connect() {
  ws = new WebSocket(`ws://${location.host}/v1`);
  ws.onopen = async () => {
    setConn('connected', 'ok');
    const r = await request('subscribe', {});
    for (const vm of r.vms) state.vms.set(vm.vm, vm);
    renderVms();
    await refreshSnapshots();
  };
  ws.onclose = () => {
    setConn('disconnected', 'bad');
    setTimeout(connect, 2000);
  };
  ws.onmessage = (m) => onFrame(JSON.parse(m.data));
}

function onFrame(f) {
  if (f.event) return onEvent(f);
  const p = pending.get(f.id);
  if (!p) return;
  pending.delete(f.id);
  if (f.ok) p.resolve(f.result);
  else p.reject(Object.assign(new Error(`${f.error.message} [${f.error.code}]`), f.error));
}

function onEvent(e) {
  if (e.event === 'vm') {
    if (e.change === 'detached') state.vms.delete(e.vm);
    else {
      const vm = state.vms.get(e.vm) ?? { vm: e.vm, operations: [] };
      vm.state = e.state ?? vm.state;
      state.vms.set(e.vm, vm);
      if (e.change === 'attached') request('status', { vm: e.vm }).then((s) => { state.vms.set(e.vm, s); renderVms(); });
    }
    renderVms();
  } else if (e.event === 'phase' || e.event === 'progress') {
    const op = state.ops.get(e.op) ?? { op: e.op, kind: e.kind, vm: e.vm, startedAt: Date.now() };
    if (e.event === 'phase') op.phase = e.phase;
    if (e.position !== undefined) op.position = e.position;
    if (e.event === 'progress') Object.assign(op, { done: e.doneBytes, total: e.totalBytes, etaMs: e.etaMs });
    state.ops.set(e.op, op);
    renderOps();
  } else if (e.event === 'result') {
    const op = state.ops.get(e.op);
    state.ops.delete(e.op);
    if (e.ok && e.kind === 'restore' && typeof e.result.restoreMs === 'number')
      state.restores.push({ at: Date.now(), ms: e.result.restoreMs, name: e.result.name });
    if (!e.ok) flash(`${e.kind} failed: ${e.error.message} [${e.error.code}]`);
    renderOps(op);
  } else if (e.event === 'store') refreshSnapshots();
}

async function refreshSnapshots() {
  state.snapshots = (await request('list', {})).snapshots;
  renderTree();
  renderChart();
}

function setConn(text, cls) {
  const el = document.getElementById('conn');
  el.textContent = text;
  el.className = `badge ${cls}`;
}

function flash(text) {
  const p = document.createElement('p');
  p.className = 'op error';
  p.textContent = text;
  document.getElementById('ops').prepend(p);
  setTimeout(() => p.remove(), 8000);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function confirmThen(text, action) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  dialog.onclose = () => {
    if (dialog.returnValue === 'yes') action().catch((err) => flash(err.message));
  };
  dialog.showModal();
}

function renderVms() {
  const body = document.querySelector('#vms tbody');
  body.replaceChildren(
    ...[...state.vms.values()].map((vm) =>
      el(
        'tr',
        { 'data-vm': vm.vm },
        el('td', {}, vm.vm),
        el('td', {}, vm.name ?? ''),
        el('td', { class: `state-${vm.state}` }, vm.state ?? '?'),
        el('td', {}, vm.qmp ?? ''),
        el('td', {}, String((vm.operations ?? []).length)),
        el(
          'td',
          {},
          el('button', { class: 'snapshot', onclick: () => askSnapshot(vm) }, 'Snapshot'),
        ),
      ),
    ),
  );
}

function askSnapshot(vm) {
  const name = `${vm.name ?? 'snap'}-${new Date().toISOString().replace(/[-:]/g, '').slice(0, 15)}`;
  confirmThen(`Snapshot VM ${vm.vm} as ${name}?`, () => request('snapshot', { vm: vm.vm, name }));
}

function renderOps() {
  const box = document.getElementById('ops');
  const ops = [...state.ops.values()];
  if (ops.length === 0) return box.replaceChildren(el('p', { class: 'empty' }, 'none running'));
  box.replaceChildren(
    ...ops.map((op) => {
      const pct = op.total ? Math.round((100 * op.done) / op.total) : 0;
      const eta = op.etaMs !== undefined ? `, ETA ${(op.etaMs / 1000).toFixed(1)} s` : '';
      const where = op.phase === 'queued' && op.position ? ` (position ${op.position})` : '';
      return el(
        'div',
        { class: 'op', 'data-op': op.op, 'data-phase': op.phase ?? '' },
        `${op.kind} ${op.vm ?? ''}: ${op.phase ?? ''}${where} ${op.total ? `${pct}%` : ''}${eta}`,
        el('div', { class: 'bar' }, el('div', { style: `width: ${pct}%` })),
      );
    }),
  );
}

function renderTree() {
  const tree = document.getElementById('tree');
  const byParent = new Map();
  for (const s of state.snapshots) {
    const key = s.parent ?? '';
    byParent.set(key, [...(byParent.get(key) ?? []), s]);
  }
  const names = new Set(state.snapshots.map((s) => s.name));
  const node = (s) =>
    el(
      'li',
      { 'data-snapshot': s.name },
      el('span', { class: 'name' }, s.name),
      el('span', { class: 'meta' }, `${s.vm} · ${s.createdAt.replace('T', ' ').slice(0, 19)} · pause ${s.downtimeMs.toFixed(1)} ms · ${s.state}`),
      el('button', { class: 'restore', onclick: () => confirmThen(`Restore ${s.name} into a new QEMU?`, () => request('restore', { name: s.name })) }, 'Restore'),
      el('button', { class: 'delete', onclick: () => confirmThen(`Delete snapshot ${s.name}?`, () => request('delete', { names: [s.name] })) }, 'Delete'),
      el('ul', {}, ...(byParent.get(s.name) ?? []).map(node)),
    );
  const roots = state.snapshots.filter((s) => !s.parent || !names.has(s.parent));
  tree.replaceChildren(...(roots.length ? roots.map(node) : [el('li', { class: 'empty' }, 'no snapshots')]));
}

function renderChart() {
  const svg = document.getElementById('chart');
  const ns = 'http://www.w3.org/2000/svg';
  const points = [
    ...state.snapshots.map((s) => ({ at: Date.parse(s.createdAt), ms: s.downtimeMs, cls: 'down', label: s.name })),
    ...state.restores.map((r) => ({ at: r.at, ms: r.ms, cls: 'restore', label: r.name })),
  ].sort((a, b) => a.at - b.at);
  svg.replaceChildren();
  if (points.length === 0) return;
  const max = Math.max(...points.map((p) => p.ms), 1);
  const [w, h, pad] = [640, 200, 30];
  const axis = document.createElementNS(ns, 'text');
  axis.setAttribute('x', '4');
  axis.setAttribute('y', '14');
  axis.textContent = `${max.toFixed(0)} ms`;
  svg.append(axis);
  points.forEach((p, i) => {
    const c = document.createElementNS(ns, 'circle');
    c.setAttribute('cx', String(pad + (i * (w - 2 * pad)) / Math.max(points.length - 1, 1)));
    c.setAttribute('cy', String(h - pad - ((h - 2 * pad) * p.ms) / max));
    c.setAttribute('r', '4');
    c.setAttribute('class', `dot ${p.cls}`);
    const t = document.createElementNS(ns, 'title');
    t.textContent = `${p.label}: ${p.ms.toFixed(1)} ms`;
    c.append(t);
    svg.append(c);
  });
}

connect();
