// couchlog dashboard: one page, no build step. It talks to CouchDB (or the nginx front) with
// absolute paths /<db>/..., sending the reader's Basic Authorization on every request: cookie
// sessions cannot pass the front.
(function () {
  'use strict';

  var TAIL_KEEP = 100;
  var LONGPOLL_CLIENT_TIMEOUT_MS = 20000; // pouchdb-server ignores `timeout`: abort and re-ask
  var BACKOFF_MAX_MS = 4000;
  var FLEET_DB = 'couchlog_fleet';
  // Fleet documents do not say their agent's fleet.interval: the default (60 s) is assumed, as
  // `agent report fleet` does without -c. A host is flagged after 3 of them.
  var FLEET_INTERVAL_S = 60;
  var FLEET_STALE_INTERVALS = 3;
  var FLEET_REFRESH_MS = 30000;
  var state = { auth: null, db: null, plot: null, reconnects: 0 };

  function $(id) { return document.getElementById(id); }

  function basic(user, password) {
    var bytes = new TextEncoder().encode(user + ':' + password);
    var text = '';
    bytes.forEach(function (b) { text += String.fromCharCode(b); });
    return 'Basic ' + btoa(text);
  }

  function request(path, signal) {
    return fetch('/' + encodeURIComponent(state.db) + path, {
      headers: { Authorization: state.auth, Accept: 'application/json' },
      cache: 'no-store', signal: signal
    });
  }

  function view(design, name, params) {
    var query = Object.keys(params).map(function (k) {
      return k + '=' + encodeURIComponent(typeof params[k] === 'string' ? params[k] : JSON.stringify(params[k]));
    }).join('&');
    return request('/_design/' + design + '/_view/' + name + '?' + query).then(function (r) {
      if (!r.ok) { throw new Error(name + ': HTTP ' + r.status + (r.status === 404 ? ' (reports not installed?)' : '')); }
      return r.json();
    }).then(function (body) { return body.rows; });
  }

  // ---- login ----
  $('login-db').value = (location.hash.match(/db=([^&]+)/) || [])[1] || $('login-db').value;
  $('login').addEventListener('submit', function (event) {
    event.preventDefault();
    state.auth = basic($('login-user').value, $('login-password').value);
    state.db = $('login-db').value.trim();
    $('login-error').textContent = '';
    request('').then(function (r) {
      if (!r.ok) {
        $('login-error').textContent = r.status === 401 || r.status === 403
          ? 'login refused (' + r.status + '): check the user, the password and that it may read ' + state.db
          : state.db + ': HTTP ' + r.status;
        return;
      }
      location.hash = 'db=' + encodeURIComponent(state.db);
      $('who').textContent = $('login-user').value + ' @ ' + state.db;
      $('login').hidden = true;
      $('main').hidden = false;
      refresh();
      fleet();
      tail();
    }).catch(function (err) { $('login-error').textContent = 'cannot reach the server: ' + err.message; });
  });

  // ---- chart of documents over time ----
  function points(name, rows) {
    var byTime = new Map();
    rows.forEach(function (row) {
      var t;
      if (name === 'attacks') {            // the seed's key: [machine, year, month from 0, day]
        if (row.key[1] === null) { return; }
        t = Date.UTC(row.key[1], row.key[2], row.key[3]) / 1000;
      } else {                             // 'YYYY-MM-DD' or 'YYYY-MM-DDTHH', UTC
        var s = row.key[0];
        t = Date.parse(s.length === 10 ? s + 'T00:00:00Z' : s + ':00:00Z') / 1000;
      }
      byTime.set(t, (byTime.get(t) || 0) + row.value);
    });
    var days = Number($('period').value);
    var from = days ? Date.now() / 1000 - days * 86400 : -Infinity;
    var xs = Array.from(byTime.keys()).filter(function (t) { return t >= from; }).sort(function (a, b) { return a - b; });
    return [xs, xs.map(function (t) { return byTime.get(t); })];
  }

  function refreshChart() {
    var parts = $('report').value.split('/');
    var level = parts[1] === 'attacks' ? 4 : 1;
    return view(parts[0], parts[1], { group_level: String(level) }).then(function (rows) {
      var data = points(parts[1], rows);
      $('total').textContent = String(data[1].reduce(function (a, b) { return a + b; }, 0));
      $('chart-error').textContent = '';
      if (state.plot) { state.plot.destroy(); }
      state.plot = new uPlot({
        width: Math.min(960, document.body.clientWidth - 20), height: 260,
        scales: { x: { time: true } },
        series: [{}, { label: $('report').selectedOptions[0].textContent, stroke: '#1565c0',
          fill: 'rgba(21,101,192,.15)', points: { show: true } }]
      }, data, $('chart'));
    }).catch(function (err) { $('chart-error').textContent = err.message; });
  }

  // ---- top values (the seed's attackers: bans per IP) ----
  function refreshTop() {
    var field = $('field').value;
    return view('couchlog', 'top_values', { group_level: '2', startkey: [field], endkey: [field, {}] })
      .then(function (rows) {
        rows.sort(function (a, b) { return b.value - a.value; });
        var body = $('top').tBodies[0];
        body.textContent = '';
        rows.slice(0, 10).forEach(function (row) {
          var tr = body.insertRow();
          tr.insertCell().textContent = text(row.key[1], 200);
          var n = tr.insertCell();
          n.textContent = String(row.value);
          n.className = 'n';
        });
      }).catch(function (err) { $('chart-error').textContent = err.message; });
  }

  function refresh() { return Promise.all([refreshChart(), refreshTop()]); }
  $('report').addEventListener('change', refreshChart);
  $('period').addEventListener('change', refreshChart);
  $('field').addEventListener('change', refreshTop);

  // ---- fleet: one document per host in couchlog_fleet (written by each agent) ----
  function ago(seconds) {
    var units = [['d', 86400], ['h', 3600], ['m', 60]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) { return Math.floor(seconds / units[i][1]) + units[i][0] + ' ago'; }
    }
    return Math.max(0, Math.floor(seconds)) + 's ago';
  }

  function updated(doc) { return Number(doc.updated_at) || 0; }

  // A field that may be missing (an older agent's document): blank, not "undefined".
  function field(value) { return value === undefined || value === null ? '' : text(value, 40); }

  function refreshFleet() {
    return fetch('/' + FLEET_DB + '/_all_docs?include_docs=true', {
      headers: { Authorization: state.auth, Accept: 'application/json' }, cache: 'no-store'
    }).then(function (r) {
      if (!r.ok) { throw new Error(FLEET_DB + ': HTTP ' + r.status + (r.status === 404 ? ' (run agent setup)' : '')); }
      return r.json();
    }).then(function (body) {
      var now = Date.now() / 1000;
      var rows = body.rows.filter(function (row) {
        return row.id.indexOf('host:') === 0 && row.doc && typeof row.doc === 'object';
      }).map(function (row) {
        var seen = updated(row.doc);
        var host = row.doc.host === undefined ? row.id.slice(5) : row.doc.host;
        return { doc: row.doc, host: text(host, 200), age: now - seen,
          stale: now - seen > FLEET_STALE_INTERVALS * FLEET_INTERVAL_S };
      });
      // Quiet hosts first, then by name: the ones that need a look are on top.
      rows.sort(function (a, b) {
        if (a.stale !== b.stale) { return a.stale ? -1 : 1; }
        return a.host < b.host ? -1 : a.host > b.host ? 1 : 0;
      });
      var tbody = $('fleet').tBodies[0];
      tbody.textContent = '';
      rows.forEach(function (row) {
        var doc = row.doc;
        var tr = tbody.insertRow();
        tr.dataset.host = row.host;
        if (row.stale) { tr.className = 'stale'; }
        var cells = [row.host, updated(doc) ? ago(row.age) : 'never', field(doc.health),
          field(doc.bytes_behind), field(doc.spool_documents), field(doc.spool_bytes),
          row.stale ? 'NOT SEEN for over ' + FLEET_STALE_INTERVALS + ' intervals'
            : doc.event === 'stop' ? 'stopped' : ''];
        cells.forEach(function (value, i) {
          var td = tr.insertCell();
          td.textContent = value;
          if (i >= 3 && i <= 5) { td.className = 'n'; }
        });
      });
      $('fleet-error').textContent = '';
    }).catch(function (err) { $('fleet-error').textContent = err.message; });
  }

  async function fleet() {
    for (;;) {
      await refreshFleet();
      await sleep(FLEET_REFRESH_MS);
    }
  }

  // ---- live tail from _changes (longpoll), reconnecting after the server or network drops ----
  function setStatus(text, kind) {
    var el = $('tail-status');
    el.textContent = text;
    el.className = 'status ' + kind;
  }

  // A document's value as text for the page. Documents are written by anyone the front lets
  // POST, so a value may be anything JSON holds: String() throws on {"toString": 1} and prints
  // [object Object] for the rest; JSON.stringify throws past the engine's nesting depth.
  function text(value, max) {
    var s;
    if (typeof value === 'string') {
      s = value;
    } else {
      try { s = JSON.stringify(value); } catch (err) { s = '(too deeply nested to show)'; }
    }
    return s.length > max ? s.slice(0, max) + '…' : s;
  }

  function show(change) {
    if (change.id.indexOf('_design/') === 0 || change.deleted) { return; }
    var doc = change.doc || {};
    var li = document.createElement('li');
    li.dataset.id = change.id;
    var summary = ['date', 'hour', 'machine', 'process', 'ip', 'message', 'msg']
      .filter(function (k) { return doc[k] !== undefined; })
      .map(function (k) { return k + '=' + text(doc[k], 200); }).join(' ');
    li.textContent = change.id + '  ' + (summary || text(doc, 200));
    var list = $('tail');
    list.insertBefore(li, list.firstChild);
    while (list.children.length > TAIL_KEEP) { list.removeChild(list.lastChild); }
  }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  async function tail() {
    var since = null;
    var failures = 0;
    for (;;) {
      var controller = new AbortController();
      var timer = setTimeout(function () { controller.abort(); }, LONGPOLL_CLIENT_TIMEOUT_MS);
      try {
        if (since === null || failures > 0) {
          // A short request first: the longpoll's headers may only come with its end (gzip),
          // so this is what says the server is back.
          var info = await request('', controller.signal);
          if (!info.ok) { throw new Error('HTTP ' + info.status); }
          var seq = (await info.json()).update_seq;
          if (since === null) { since = seq; }
          if (failures > 0) {
            state.reconnects += 1;
            $('reconnects').textContent = String(state.reconnects);
            failures = 0;
          }
          setStatus(state.reconnects ? 'live (reconnected)' : 'live', 'live');
        }
        var r = await request('/_changes?feed=longpoll&include_docs=true&heartbeat=6000&timeout=15000&since=' +
          encodeURIComponent(since), controller.signal);
        if (!r.ok) { throw new Error('HTTP ' + r.status); }
        var body = await r.json();
        // Every change is shown on its own: one that cannot be shown must not stop the tail
        // (the batch would be asked for, and shown, again and again).
        body.results.forEach(function (change) {
          try { show(change); } catch (err) { console.error('couchlog: cannot show', change.id, err); }
        });
        since = body.last_seq;
      } catch (err) {
        clearTimeout(timer);
        if (err.name === 'AbortError' && failures === 0) { continue; } // our timeout: ask again
        failures += 1;
        setStatus('disconnected: reconnecting (attempt ' + failures + ')', 'down');
        await sleep(Math.min(BACKOFF_MAX_MS, 250 * Math.pow(2, failures)));
        continue;
      }
      clearTimeout(timer);
    }
  }

  document.body.dataset.ready = '1';
}());
