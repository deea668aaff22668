# Makes directory DST (a copy of an older data directory) equal to SRC, rewriting only the
# changed 8 KiB pages in place, so unchanged files keep inode and mtime as in a live database.
#   python3 apply_in_place.py SRC DST
import os,sys
src,dst=sys.argv[1],sys.argv[2]
P=8192
for root,ds,fs in os.walk(src):
    for d in ds:
        os.makedirs(os.path.join(dst,os.path.relpath(os.path.join(root,d),src)),exist_ok=True)
    for f in fs:
        ps=os.path.join(root,f); pd=os.path.join(dst,os.path.relpath(ps,src))
        a=open(ps,'rb').read()
        if not os.path.exists(pd):
            open(pd,'wb').write(a); continue
        with open(pd,'r+b') as h:
            b=h.read()
            if a==b: continue
            for i in range(0,len(a),P):
                if a[i:i+P]!=b[i:i+P]:
                    h.seek(i); h.write(a[i:i+P])
            h.truncate(len(a))
for root,ds,fs in os.walk(dst):
    for f in fs:
        pd=os.path.join(root,f)
        if not os.path.exists(os.path.join(src,os.path.relpath(pd,dst))): os.remove(pd)
