// statemill live view: a table of products kept current by server-sent
// events, a history on demand, and the state machine with live counts.
// Plain DOM, no framework; product data only ever goes in as text.
'use strict';

(() => {
  const STATES = {
    initialized: { label: 'initialized', icon: '○' },
    created: { label: 'created', icon: '◆' },
    in_stock: { label: 'in stock', icon: '✔' },
    out_of_stock: { label: 'out of stock', icon: '▲' },
    discontinued: { label: 'discontinued', icon: '✕' },
  };
  const stateInfo = (s) => STATES[s] || { label: String(s).replaceAll('_', ' '), icon: '•' };
  const words = (s) => String(s).replaceAll('_', ' ');

  const money = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD' });
  const clock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const dated = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector('#products tbody');
  const dialog = $('history');
  const historyBody = $('history-body');

  const products = new Map(); // id → product
  let lastEventId = '';
  let feed = { connected: false, replaying: true }; // the server's feed, from "status"
  let streamOpen = false;
  let everOpen = false;
  let source = null;
  let reopenDelay = 1000;
  let historyFor = ''; // the product whose history is open
  let marked = ''; // the product whose state the diagram marks

  // h builds an element; strings become text nodes, never markup.
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function timeEl(iso) {
    const d = new Date(iso);
    const today = new Date().toDateString() === d.toDateString();
    return h('time', { datetime: iso, title: dated.format(d) }, today ? clock.format(d) : dated.format(d));
  }

  function badge(state) {
    const info = stateInfo(state);
    return h('span', { class: 'badge', 'data-state': state },
      h('span', { class: 'badge-icon', 'aria-hidden': 'true' }, info.icon), info.label);
  }

  const byName = (a, b) => {
    const x = a.name.toLowerCase();
    const y = b.name.toLowerCase();
    if (x !== y) return x < y ? -1 : 1;
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  };

  // ---- the table ----

  function newRow(p) {
    const tr = h('tr', { 'data-id': p.id });
    const button = h('button', { type: 'button', class: 'button history-button', 'data-id': p.id }, 'History');
    tr.append(
      h('th', { scope: 'row', class: 'name' }),
      h('td', { class: 'num price' }),
      h('td', { class: 'num inventory' }),
      h('td', { class: 'state' }),
      h('td', { class: 'updated' }),
      h('td', { class: 'actions' }, button),
    );
    return tr;
  }

  // fillRow updates the cells in place, so a focused button keeps its focus.
  function fillRow(tr, p) {
    tr.dataset.state = p.state;
    tr.dataset.version = String(p.version);
    tr.querySelector('.name').textContent = p.name;
    tr.querySelector('.price').textContent = money.format(p.price / 100);
    tr.querySelector('.inventory').textContent = String(p.inventory);
    tr.querySelector('.state').replaceChildren(badge(p.state));
    tr.querySelector('.updated').replaceChildren(timeEl(p.updated_at));
    tr.querySelector('.history-button').setAttribute('aria-label', `History of ${p.name}`);
  }

  function rowOf(id) {
    return tbody.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  }

  function placeRow(tr, p) {
    for (const other of tbody.rows) {
      if (other === tr) return; // already before every later one
      const q = products.get(other.dataset.id);
      if (q && byName(p, q) < 0) {
        tbody.insertBefore(tr, other);
        return;
      }
    }
    tbody.append(tr);
  }

  function upsert(p, flash) {
    let tr = rowOf(p.id);
    const isNew = !tr;
    if (isNew) tr = newRow(p);
    fillRow(tr, p);
    if (isNew) placeRow(tr, p);
    if (flash) {
      tr.classList.remove('changed');
      void tr.offsetWidth; // restart the animation
      tr.classList.add('changed');
    }
  }

  function applySnapshot(snap) {
    const ids = new Set(snap.products.map((p) => p.id));
    for (const tr of [...tbody.rows]) {
      if (!ids.has(tr.dataset.id)) tr.remove();
    }
    products.clear();
    for (const p of snap.products) products.set(p.id, p);
    for (const p of [...snap.products].sort(byName)) upsert(p, false);
    render();
  }

  function applyChange(c) {
    const p = c.product;
    const before = products.get(p.id);
    if (before && before.version >= p.version) return;
    products.set(p.id, p);
    upsert(p, true);
    render();
    if (!feed.replaying) {
      const what = c.event === 'create' ? 'new product' : words(c.event);
      $('announce').textContent = `${p.name}: ${what}, now ${stateInfo(p.state).label}, inventory ${p.inventory}.`;
    }
    if (historyFor === p.id && dialog.open) loadHistory(p.id);
  }

  function render() {
    // While the model is refilled from history, an empty table is not news.
    $('empty').hidden = products.size > 0 || feed.replaying;
    $('loading').hidden = products.size > 0 || !feed.replaying;
    const counts = {};
    for (const p of products.values()) counts[p.state] = (counts[p.state] || 0) + 1;
    const parts = Object.keys(STATES)
      .filter((s) => counts[s])
      .map((s) => `${counts[s]} ${stateInfo(s).label}`);
    const n = products.size;
    $('summary').textContent = `${n} ${n === 1 ? 'product' : 'products'}${parts.length ? ' · ' + parts.join(', ') : ''}`;
    renderDiagram(counts);
  }

  // ---- the diagram ----

  let diagram = null;

  async function loadDiagram() {
    try {
      const res = await fetch('/ui/diagram.svg');
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const doc = new DOMParser().parseFromString(await res.text(), 'image/svg+xml');
      const svg = doc.documentElement;
      if (svg.nodeName !== 'svg') throw new Error('not an SVG');
      diagram = document.importNode(svg, true);
      $('machine').prepend(diagram);
      const counts = {};
      for (const p of products.values()) counts[p.state] = (counts[p.state] || 0) + 1;
      renderDiagram(counts);
    } catch (err) {
      $('machine').prepend(h('p', { class: 'error' }, `The diagram could not be loaded (${err.message}).`));
    }
  }

  function renderDiagram(counts) {
    if (!diagram) return;
    const parts = [];
    for (const g of diagram.querySelectorAll('g.state')) {
      const s = g.dataset.state;
      const n = counts[s] || 0;
      g.classList.toggle('occupied', n > 0);
      const text = g.querySelector('text.count');
      if (text) text.textContent = `${n} ${n === 1 ? 'product' : 'products'}`;
      parts.push(`${stateInfo(s).label}: ${n}`);
    }
    diagram.setAttribute('aria-label', `Product state machine. Products per state: ${parts.join(', ')}.`);
    mark(marked);
  }

  // mark shows the state of product id in the diagram ('' for none).
  function mark(id) {
    marked = id;
    if (!diagram) return;
    const p = products.get(id);
    for (const g of diagram.querySelectorAll('g.state')) {
      g.classList.toggle('current', !!p && g.dataset.state === p.state);
    }
  }

  tbody.addEventListener('mouseover', (e) => {
    const tr = e.target.closest('tr');
    if (tr) mark(tr.dataset.id);
  });
  tbody.addEventListener('mouseleave', () => mark(historyFor));
  tbody.addEventListener('focusin', (e) => {
    const tr = e.target.closest('tr');
    if (tr) mark(tr.dataset.id);
  });
  tbody.addEventListener('focusout', () => mark(historyFor));

  // ---- history ----

  tbody.addEventListener('click', (e) => {
    const button = e.target.closest('button.history-button');
    if (button) openHistory(button.dataset.id);
  });
  $('history-close').addEventListener('click', () => dialog.close());
  dialog.addEventListener('close', () => {
    historyFor = '';
    mark('');
  });

  function openHistory(id) {
    const p = products.get(id);
    historyFor = id;
    $('history-title').textContent = `History of ${p ? p.name : 'a product'}`;
    historyBody.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    historyBody.setAttribute('aria-busy', 'true');
    dialog.showModal();
    mark(id);
    loadHistory(id);
  }

  async function loadHistory(id) {
    try {
      const res = await fetch(`/ui/products/${encodeURIComponent(id)}/history`, { headers: { Accept: 'application/json' } });
      if (!res.ok) {
        let detail = `HTTP ${res.status}`;
        try {
          const problem = await res.json();
          detail = problem.detail || problem.title || detail;
        } catch { /* not a problem document */ }
        throw new Error(detail);
      }
      const transitions = await res.json();
      if (historyFor !== id) return; // closed or switched meanwhile
      historyBody.replaceChildren(historyTable(id, transitions));
    } catch (err) {
      if (historyFor !== id) return;
      historyBody.replaceChildren(h('p', { class: 'error', role: 'alert' }, `The history could not be loaded: ${err.message}`));
    } finally {
      if (historyFor === id) historyBody.removeAttribute('aria-busy');
    }
  }

  function historyTable(id, transitions) {
    const p = products.get(id);
    const body = h('tbody');
    for (const t of transitions) {
      const a = t.entity_attributes || {};
      body.append(h('tr', { 'data-version': String(t.version) },
        h('td', { class: 'num' }, String(t.version)),
        h('th', { scope: 'row' }, words(t.event)),
        h('td', {}, stateInfo(t.from).label,
          h('span', { class: 'arrow', 'aria-hidden': 'true' }, '→'),
          h('span', { class: 'visually-hidden' }, ' to '),
          stateInfo(t.to).label),
        h('td', { class: 'num' }, a.inventory === undefined ? '' : String(a.inventory)),
        h('td', { class: 'num' }, a.price === undefined ? '' : money.format(a.price / 100)),
        h('td', {}, timeEl(t.occurred_at)),
      ));
    }
    return h('table', {},
      h('caption', { class: 'visually-hidden' }, `Transitions of ${p ? p.name : 'the product'}, oldest first`),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col', class: 'num' }, 'Version'),
        h('th', { scope: 'col' }, 'Event'),
        h('th', { scope: 'col' }, 'State change'),
        h('th', { scope: 'col', class: 'num' }, 'Inventory'),
        h('th', { scope: 'col', class: 'num' }, 'Price'),
        h('th', { scope: 'col' }, 'When'),
      )),
      body);
  }

  // ---- the connection ----

  function renderConnection() {
    let state;
    let icon;
    let text;
    if (!streamOpen) {
      [state, icon, text] = everOpen
        ? ['offline', '◌', 'Connection lost, reconnecting…']
        : ['connecting', '◌', 'Connecting…'];
    } else if (!feed.connected) {
      [state, icon, text] = ['degraded', '▲', 'Server reconnecting to the broker; changes are delayed'];
    } else if (feed.replaying) {
      [state, icon, text] = ['rebuilding', '◐', 'Rebuilding from history…'];
    } else {
      [state, icon, text] = ['live', '●', 'Live'];
    }
    const el = $('connection');
    if (el.dataset.state === state) return; // unchanged: do not announce again
    el.dataset.state = state;
    el.querySelector('.connection-icon').textContent = icon;
    el.querySelector('.connection-text').textContent = text;
  }

  function connect() {
    // A fresh EventSource sends no Last-Event-ID header: carry it in the
    // query. The browser's own reconnects send the header, which wins.
    const url = '/ui/events' + (lastEventId ? `?last_event_id=${encodeURIComponent(lastEventId)}` : '');
    source = new EventSource(url);
    source.addEventListener('open', () => {
      streamOpen = true;
      everOpen = true;
      reopenDelay = 1000;
      renderConnection();
    });
    source.addEventListener('snapshot', (e) => {
      lastEventId = e.lastEventId;
      applySnapshot(JSON.parse(e.data));
    });
    source.addEventListener('change', (e) => {
      lastEventId = e.lastEventId;
      applyChange(JSON.parse(e.data));
    });
    source.addEventListener('status', (e) => {
      feed = JSON.parse(e.data);
      renderConnection();
      render();
    });
    source.addEventListener('error', () => {
      streamOpen = false;
      renderConnection();
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (the server answered with an error): retry
        // with backoff ourselves.
        source.close();
        setTimeout(connect, reopenDelay);
        reopenDelay = Math.min(reopenDelay * 2, 15000);
      }
    });
  }

  window.addEventListener('pagehide', () => source && source.close());

  loadDiagram();
  connect();
})();
