window.__errors=[];function __rec(m){window.__errors.push(String(m));document.body&&document.body.setAttribute('data-errors',window.__errors.join(' | '));}
window.addEventListener('error',function(e){__rec(e.message||e.type);});
var __ce=console.error;console.error=function(){__rec(Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments);};
