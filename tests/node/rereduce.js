// Runs every custom reduce of the given design documents the way CouchDB does: over chunks of
// the map's rows (rereduce = false), then over chunks of those results (rereduce = true) until
// one value is left, for many random splits, and compares with a one-pass reduce per group.
// pouchdb-server never calls rereduce, so this is where that branch is tested.
//
// stdin: {"designs": {id: designDoc}, "docs": [...], "splits": N, "seed": S}
// stdout: {"checked": [{"view", "group_level", "groups", "splits"}], "mismatches": [...]}
'use strict';

const BUILTIN = new Set(['_count', '_sum', '_stats', '_approx_count_distinct']);

function compile(source, emit) {
  // The sandbox CouchDB gives view functions: emit, sum, log, isArray, toJSON.
  const sum = (values) => values.reduce((a, b) => a + b, 0);
  const log = () => {};
  const isArray = Array.isArray;
  const toJSON = JSON.stringify;
  return new Function('emit', 'sum', 'log', 'isArray', 'toJSON',
    '"use strict"; return (' + source + ');')(emit, sum, log, isArray, toJSON);
}

function canonical(value) {
  // Object key order is not part of a reduce's result.
  if (Array.isArray(value)) return '[' + value.map(canonical).join(',') + ']';
  if (value && typeof value === 'object') {
    return '{' + Object.keys(value).sort().map((k) => JSON.stringify(k) + ':' + canonical(value[k])).join(',') + '}';
  }
  return JSON.stringify(value === undefined ? null : value);
}

function random(seed) {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13; state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5; state >>>= 0;
    return state / 4294967296;
  };
}

function chunks(items, rnd) {
  const out = [];
  let i = 0;
  while (i < items.length) {
    const size = 1 + Math.floor(rnd() * Math.min(items.length - i, 1 + Math.floor(rnd() * 40)));
    out.push(items.slice(i, i + size));
    i += size;
  }
  return out;
}

function splitReduce(reduce, rows, rnd) {
  // Leaves: reduce over consecutive rows, as a B-tree's leaf nodes hold them.
  let level = chunks(rows, rnd).map((part) =>
    reduce(part.map((r) => [r.key, r.id]), part.map((r) => JSON.parse(JSON.stringify(r.value))), false));
  // Inner nodes: rereduce chunks of results until one is left (at least one rereduce pass).
  do {
    level = chunks(level, rnd).map((part) => reduce(null, JSON.parse(JSON.stringify(part)), true));
  } while (level.length > 1);
  return level[0];
}

function groupKey(key, level) {
  if (level === null) return '';
  return canonical(Array.isArray(key) ? key.slice(0, level) : key);
}

function main(input) {
  const rnd = random(input.seed || 1);
  const result = { checked: [], mismatches: [] };
  for (const [id, design] of Object.entries(input.designs)) {
    for (const [name, view] of Object.entries(design.views || {})) {
      if (!view.reduce || BUILTIN.has(view.reduce)) continue;
      let rows = [];
      let current = null;
      const map = compile(view.map, (key, value) => {
        rows.push({ key: key === undefined ? null : JSON.parse(JSON.stringify(key === undefined ? null : key)),
          id: current._id, value: value === undefined ? null : value });
      });
      for (const doc of input.docs) { current = doc; map(JSON.parse(JSON.stringify(doc))); }
      rows.sort((a, b) => (canonical(a.key) < canonical(b.key) ? -1 : canonical(a.key) > canonical(b.key) ? 1 : 0));
      const reduce = compile(view.reduce, () => { throw new Error('emit in reduce'); });
      const keyLength = Math.max(0, ...rows.map((r) => (Array.isArray(r.key) ? r.key.length : 1)));
      const levels = [0];
      for (let l = 1; l <= keyLength; l++) levels.push(l);
      for (const level of levels) {
        const groups = new Map();
        for (const row of rows) {
          const k = groupKey(row.key, level);
          if (!groups.has(k)) groups.set(k, []);
          groups.get(k).push(row);
        }
        for (const [k, groupRows] of groups) {
          const once = reduce(groupRows.map((r) => [r.key, r.id]), groupRows.map((r) => r.value), false);
          for (let s = 0; s < (input.splits || 20); s++) {
            const split = splitReduce(reduce, groupRows, rnd);
            if (canonical(split) !== canonical(once)) {
              result.mismatches.push({ design: id, view: name, group_level: level, group: k,
                one_pass: once, split: split });
              break;
            }
          }
        }
        result.checked.push({ design: id, view: name, group_level: level, groups: groups.size,
          rows: rows.length, splits: input.splits || 20 });
      }
    }
  }
  process.stdout.write(JSON.stringify(result));
}

let text = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { text += chunk; });
process.stdin.on('end', () => main(JSON.parse(text)));
