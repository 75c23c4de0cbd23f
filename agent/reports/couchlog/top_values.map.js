function(doc) {
  // One row per (field, value) for the fields people rank by; the field is chosen at query time
  // with startkey [field] and endkey [field, {}]. Only these fields, so the index stays small.
  var fields = ['ip', 'process', 'host', 'machine', 'level', 'status', 'user', 'program'];
  var i, value;
  for (i = 0; i < fields.length; i++) {
    value = doc[fields[i]];
    if (typeof value === 'string' || typeof value === 'number') {
      emit([fields[i], value], 1);
    }
  }
  if (doc.agent && typeof doc.agent.source === 'string') {
    emit(['source', doc.agent.source], 1);
  }
}
