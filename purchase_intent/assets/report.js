(function(){
var NS='http://www.w3.org/2000/svg',COLORS=['#0072B2','#E69F00','#009E73','#D55E00','#CC79A7','#56B4E9','#8c6d31','#000000'];
function el(tag,attrs,parent,text){var e=document.createElementNS(NS,tag);for(var k in attrs)if(attrs[k]!=null)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=text;if(parent)parent.appendChild(e);return e;}
function ticks(lo,hi,n){var span=hi-lo||1,step=Math.pow(10,Math.floor(Math.log10(span/n))),err=span/n/step;
  step*=err>=7.5?10:err>=3.5?5:err>=1.5?2:1;var t=[];for(var v=Math.ceil(lo/step)*step;v<=hi+step*1e-9;v+=step)t.push(+v.toFixed(12));return t;}
function fmt(v,kind){if(kind==='pct')return (v*100).toFixed(Math.abs(v)<0.1&&v!==0?1:0)+'%';
  if(kind==='date'){var d=new Date(v*86400000);return d.toISOString().slice(5,10);}
  var a=Math.abs(v);if(a>0&&a<1e-3)return v.toExponential(0);return a>=1e6?(v/1e6).toFixed(1)+'M':a>=1e3?(v/1e3).toFixed(a>=1e4?0:1)+'k':a>=10||v===0?v.toFixed(0):+v.toPrecision(2)+'';}
function line(fig,s){
  var W=s.wide?980:480,H=300,m={l:58,r:14,t:12,b:46},w=W-m.l-m.r,h=H-m.t-m.b;
  var svg=el('svg',{viewBox:'0 0 '+W+' '+H,role:'img','aria-label':s.title},fig);
  var xs=[],ys=[];s.series.forEach(function(se){se.points.forEach(function(p){xs.push(p[0]);ys.push(p[1]);});});
  var ly=!!s.ylog,tr=function(v){return ly?Math.log10(Math.max(v,0.5)):v;};
  var x0=s.xmin!==undefined?s.xmin:Math.min.apply(null,xs),x1=s.xmax!==undefined?s.xmax:Math.max.apply(null,xs);
  var y0=s.ymin!==undefined?s.ymin:Math.min(0,Math.min.apply(null,ys)),y1=s.ymax!==undefined?s.ymax:Math.max.apply(null,ys)*1.05;
  if(ly){y0=tr(Math.max(Math.min.apply(null,ys.filter(function(v){return v>0;})),1))-0.05;y1=tr(Math.max.apply(null,ys))+0.1;}
  if(x1<=x0)x1=x0+1;if(y1<=y0)y1=y0+1;
  var X=function(v){return m.l+(v-x0)/(x1-x0)*w;},Y=function(v){return m.t+h-(tr(v)-y0)/(y1-y0)*h;};
  var ax=el('g',{'class':'axis'},svg);
  var yt=ly?ticks(Math.ceil(y0),Math.floor(y1),4).filter(function(v){return v%1===0;}).map(function(v){return Math.pow(10,v);}):ticks(y0,y1,5);
  yt.forEach(function(v){var yy=Y(v);el('line',{x1:m.l,x2:m.l+w,y1:yy,y2:yy,'class':'gridline'},ax);
    el('text',{x:m.l-6,y:yy+4,'text-anchor':'end'},ax,fmt(v,s.yfmt));});
  ticks(x0,x1,s.xtype==='date'?6:5).forEach(function(v){var xx=X(v);el('line',{x1:xx,x2:xx,y1:m.t+h,y2:m.t+h+4},ax);
    el('text',{x:xx,y:m.t+h+16,'text-anchor':'middle'},ax,fmt(v,s.xtype==='date'?'date':s.xfmt));});
  el('path',{d:'M'+m.l+','+m.t+'V'+(m.t+h)+'H'+(m.l+w),fill:'none'},ax);
  el('text',{x:m.l+w/2,y:H-6,'text-anchor':'middle','class':'label'},svg,s.xlabel);
  el('text',{x:12,y:m.t+h/2,'text-anchor':'middle','class':'label',transform:'rotate(-90 12 '+(m.t+h/2)+')'},svg,s.ylabel);
  if(s.diagonal)el('path',{d:'M'+X(x0)+','+Y(x0)+'L'+X(Math.min(x1,y1))+','+Y(Math.min(x1,y1)),stroke:'#9aa3b0','stroke-dasharray':'4 4',fill:'none'},svg);
  if(s.hline!==undefined)el('path',{d:'M'+m.l+','+Y(s.hline)+'H'+(m.l+w),stroke:'#9aa3b0','stroke-dasharray':'4 4',fill:'none'},svg);
  var marks=0,lg=document.createElement('div');lg.className='legend';fig.insertBefore(lg,svg);
  s.series.forEach(function(se,i){var c=se.color||COLORS[i%COLORS.length],d='';
    se.points.forEach(function(p,j){d+=(j?'L':'M')+X(p[0]).toFixed(1)+','+Y(p[1]).toFixed(1);});
    if(d){el('path',{d:d,fill:'none',stroke:c,'stroke-width':2,'stroke-dasharray':se.dash?'5 3':null,'class':'series'},svg);marks++;}
    if(se.dots)se.points.forEach(function(p){el('circle',{cx:X(p[0]),cy:Y(p[1]),r:3,fill:c},svg);});
    var item=document.createElement('span'),sw=document.createElement('i');sw.style.background=c;
    if(se.dash)sw.style.background='repeating-linear-gradient(90deg,'+c+' 0 5px,transparent 5px 8px)';item.appendChild(sw);item.appendChild(document.createTextNode(se.name));lg.appendChild(item);});
  return marks;}
function bars(fig,s){
  var n=s.bars.length,W=480,lw=s.labelWidth||190,rh=20,m={t:6,b:36,r:16},H=m.t+m.b+n*rh,w=W-lw-m.r;
  var svg=el('svg',{viewBox:'0 0 '+W+' '+H,role:'img','aria-label':s.title},fig);
  var vs=s.bars.map(function(b){return b.value;}),lo=Math.min(0,Math.min.apply(null,vs)),hi=Math.max(0,Math.max.apply(null,vs));
  if(hi<=lo)hi=lo+1;var X=function(v){return lw+(v-lo)/(hi-lo)*w;},ax=el('g',{'class':'axis'},svg);
  ticks(lo,hi,4).forEach(function(v){el('line',{x1:X(v),x2:X(v),y1:m.t,y2:m.t+n*rh,'class':'gridline'},ax);
    el('text',{x:X(v),y:m.t+n*rh+14,'text-anchor':'middle'},ax,fmt(v,s.xfmt));});
  el('text',{x:lw+w/2,y:H-4,'text-anchor':'middle','class':'label'},svg,s.xlabel);
  s.bars.forEach(function(b,i){var y=m.t+i*rh,x=X(Math.min(0,b.value)),bw=Math.max(Math.abs(X(b.value)-X(0)),1);
    var r=el('rect',{x:x,y:y+4,width:bw,height:rh-8,fill:b.value<0?'#2e86c1':(s.color||'#c0392b'),rx:2},svg);
    el('title',{},r,b.label+': '+b.value.toPrecision(3));
    el('text',{x:lw-6,y:y+rh/2+4,'text-anchor':'end','class':'label'},svg,b.label.length>30?b.label.slice(0,29)+'…':b.label);});
  el('line',{x1:X(0),x2:X(0),y1:m.t,y2:m.t+n*rh,stroke:'#66707f'},svg);
  return n;}
var specs=JSON.parse(document.getElementById('chart-data').textContent),done=0;
specs.forEach(function(s){var fig=document.getElementById(s.id);if(!fig)throw new Error('no figure '+s.id);
  var marks=s.kind==='bar'?bars(fig,s):line(fig,s),svg=fig.querySelector('svg'),box=svg.getBoundingClientRect();
  if(marks>0&&box.width>0&&box.height>0){fig.setAttribute('data-rendered','1');done++;}});
document.body.setAttribute('data-charts-rendered',String(done));
})();
