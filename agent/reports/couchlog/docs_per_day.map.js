function(doc) {
  // The agent's metadata: when the line was read (ISO 8601, UTC) and the source it came from.
  var m = doc.agent;
  if (m && typeof m.read_at === 'string') {
    emit([m.read_at.slice(0, 10), m.source], 1);
  }
}
