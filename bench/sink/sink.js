// A CouchDB-shaped _bulk_docs sink for benchmarks: one result per document, as CouchDB answers,
// and the document count in $bulk_docs for the access log (njs 0.7 has no shared memory).
function bulk(r) {
    var docs = JSON.parse(r.requestText).docs;
    var out = new Array(docs.length);
    for (var i = 0; i < docs.length; i++) {
        out[i] = {ok: true, id: docs[i]._id || ("gen" + i), rev: "1-0"};
    }
    r.variables.bulk_docs = String(docs.length);
    r.headersOut["Content-Type"] = "application/json";
    r.return(201, JSON.stringify(out));
}

export default {bulk};
