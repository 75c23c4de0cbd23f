function(keys, values, rereduce) {
  var result = {};
  var i, ip;
  if (rereduce) {
    for (i = 0; i < values.length; i++) {
      for (ip in values[i]) {
        result[ip] = (result[ip] || 0) + values[i][ip];
      }
    }
    return result;
  }
  for (i = 0; i < keys.length; i++) {
    ip = keys[i][0][0];
    result[ip] = (result[ip] || 0) + 1;
  }
  return result;
}
